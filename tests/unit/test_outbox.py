"""common/outbox.py: items per peer go out together at the end of the loop iteration,
or in groups of the burst limit while the iteration goes on."""

from __future__ import annotations

import asyncio

from despina.common import outbox


def test_items_wait_for_the_end_of_the_iteration():
    async def scenario():
        flushed: list[dict] = []
        box = outbox.Outbox(flushed.append)
        for i in range(3):
            box.put("a", i)
        box.put("b", "x")
        assert flushed == []  # nothing leaves during the wake
        await asyncio.sleep(0)
        return flushed

    assert asyncio.run(scenario()) == [{"a": [0, 1, 2], "b": ["x"]}]


def test_a_peer_reaching_the_limit_is_sent_at_once():
    async def scenario():
        flushed: list[dict] = []
        box = outbox.Outbox(flushed.append, limit=4)
        for i in range(9):
            box.put("a", i)
            if i < 2:
                box.put("b", i)
        during = [dict(f) for f in flushed]
        await asyncio.sleep(0)
        return during, flushed[len(during) :]

    during, after = asyncio.run(scenario())
    assert during == [{"a": [0, 1, 2, 3]}, {"a": [4, 5, 6, 7]}]
    assert after == [{"a": [8], "b": [0, 1]}]


def test_default_limit_is_the_measured_one():
    async def scenario():
        flushed: list[dict] = []
        box = outbox.Outbox(flushed.append)
        for i in range(outbox.BURST_LIMIT):
            box.put("a", i)
        return flushed

    assert asyncio.run(scenario()) == [{"a": list(range(outbox.BURST_LIMIT))}]
