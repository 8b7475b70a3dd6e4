"""common/busypoll.py: a lightly loaded process keeps its loop turning for a budget while
an answer is due, stops when it comes or the budget runs out, and after misses in a row
only probes now and then."""

from __future__ import annotations

import asyncio
import time

from despina.common import busypoll


async def _until_stopped(poll: busypoll.BusyPoll, limit_s: float = 1.0) -> int:
    """Loop iterations until ``poll`` stops polling."""
    turns = 0
    deadline = time.monotonic() + limit_s
    while poll.polling and time.monotonic() < deadline:
        await asyncio.sleep(0)
        turns += 1
    return turns


def test_a_zero_budget_never_polls():
    async def scenario():
        poll = busypoll.BusyPoll(0.0, lambda: True)
        poll.arm()
        return poll.polling

    assert asyncio.run(scenario()) is False


def test_polls_until_the_budget_runs_out_and_counts_a_miss():
    async def scenario():
        asked = 0

        def waiting() -> bool:
            nonlocal asked
            asked += 1
            return True

        poll = busypoll.BusyPoll(0.005, waiting)
        start = time.monotonic()
        poll.arm()
        assert poll.polling
        turns = await _until_stopped(poll)
        return time.monotonic() - start, turns, asked, poll._misses

    elapsed, turns, asked, misses = asyncio.run(scenario())
    assert elapsed >= 0.005
    assert turns > 10 and asked > 10  # the loop kept turning, never slept the budget away
    assert misses == 1


def test_stops_as_soon_as_what_it_waits_for_comes():
    async def scenario():
        pending = [True]
        poll = busypoll.BusyPoll(10.0, lambda: pending[0])
        poll._misses = 2
        poll.arm()
        for _ in range(5):
            await asyncio.sleep(0)
        assert poll.polling
        pending[0] = False
        turns = await _until_stopped(poll)
        return turns, poll._misses

    turns, misses = asyncio.run(scenario())
    assert turns <= 2
    assert misses == 0  # a poll that caught its answer clears the misses


def test_after_misses_in_a_row_only_one_arm_in_probe_every_polls():
    async def scenario():
        poll = busypoll.BusyPoll(0.001, lambda: True)
        for _ in range(busypoll.MISSES):
            poll.arm()
            await _until_stopped(poll)
        assert poll._misses == busypoll.MISSES
        polled = []
        for _ in range(2 * busypoll.PROBE_EVERY):
            poll.arm()
            polled.append(poll.polling)
            await _until_stopped(poll)
        return polled

    polled = asyncio.run(scenario())
    assert polled.count(True) == 2
    assert polled.index(True) == busypoll.PROBE_EVERY - 1


def test_armed_again_while_polling_extends_it_and_clears_misses():
    async def scenario():
        poll = busypoll.BusyPoll(0.004, lambda: True)
        poll._misses = busypoll.MISSES - 1
        poll.arm()
        await asyncio.sleep(0.003)  # an answer came and was answered: armed again
        poll.arm()
        misses_after_rearm = poll._misses
        start = time.monotonic()
        await _until_stopped(poll)
        return misses_after_rearm, time.monotonic() - start

    misses_after_rearm, rest = asyncio.run(scenario())
    assert misses_after_rearm == 0
    assert rest >= 0.003  # the budget counts from the second arm
