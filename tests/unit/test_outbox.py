"""common/outbox.py: items per peer go out together at the end of the loop iteration,
or in groups of the burst limit while the iteration goes on; at once with ``now``, and at
the end of a ``gathering`` block, with no loop callback either way."""

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
    """4 won the measured sweep of limits 0-16 (loadtest/README.md, "bursts of 4"); an
    Outbox built without a limit sends a peer's 4th item at once, not its 3rd."""

    async def scenario():
        flushed: list[dict] = []
        box = outbox.Outbox(flushed.append)
        for i in range(3):
            box.put("a", i)
        after_three = len(flushed)
        box.put("a", 3)
        return after_three, flushed

    assert outbox.BURST_LIMIT == 4
    assert asyncio.run(scenario()) == (0, [{"a": [0, 1, 2, 3]}])


def test_now_sends_it_with_all_that_waits_without_a_loop_callback():
    async def scenario():
        flushed: list[dict] = []
        box = outbox.Outbox(flushed.append)
        box.put("a", 1)
        box.put("b", 2, now=True)  # what waited for "a" goes with it, in one flush
        during = list(flushed)
        handles = len(asyncio.get_running_loop()._ready)  # type: ignore[attr-defined]
        box.put("c", 3, now=True)
        assert len(asyncio.get_running_loop()._ready) == handles  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        return during, flushed

    during, flushed = asyncio.run(scenario())
    assert during == [{"a": [1], "b": [2]}]
    assert flushed == [{"a": [1], "b": [2]}, {"c": [3]}]


def test_gathering_sends_the_block_items_at_its_end():
    async def scenario():
        flushed: list[dict] = []
        box = outbox.Outbox(flushed.append, limit=4)
        ready = len(asyncio.get_running_loop()._ready)  # type: ignore[attr-defined]
        with box.gathering:
            for i in range(6):
                box.put("a", i)
            box.put("b", "x")
            assert flushed == [{"a": [0, 1, 2, 3]}]  # the limit still applies
        assert flushed == [{"a": [0, 1, 2, 3]}, {"a": [4, 5], "b": ["x"]}]
        assert len(asyncio.get_running_loop()._ready) == ready  # no flush was scheduled
        box.put("c", 1)  # after the block: the next iteration again
        assert len(flushed) == 2
        await asyncio.sleep(0)
        return flushed

    assert asyncio.run(scenario())[-1] == {"c": [1]}
