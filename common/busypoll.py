"""Busy polling: a lightly loaded process keeps its event loop turning, without
sleeping, for a short while when a message is due soon.

On a virtual machine a process asleep in ``epoll_wait`` costs whoever wakes it tens of
µs: an interrupt to a halted vCPU, then a cold core (loadtest/README, "Busy polling":
a unix-socket round trip between two processes 79 µs asleep, 9 µs polling). A request
at low load wakes the frontend and the backend host twice over; polling instead of
sleeping in those gaps halves its latency.

``BusyPoll.arm`` keeps the loop turning (each turn polls the loop's sockets with a zero
timeout, then yields the CPU to whatever else is runnable on it) until ``budget_s`` has
passed or ``waiting()`` turns false (what it waits for came). The owner arms it only
under light load: under heavy load the loop has work of its own, and polling would take
CPU the other processes need.
An idle server never polls, since only a message sent arms it. Polls that run out with
nothing come are misses; after ``MISSES`` in a row only one arm in ``PROBE_EVERY`` polls,
until one catches a message again, so a trickle of requests costs little CPU.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

# Light load: at most this many requests in flight (a frontend) or answered in one go (a
# backend host). Heavier, the processes have work of their own to wake for.
LIGHT_LOAD = 2
MISSES = 3
PROBE_EVERY = 16


class BusyPoll:
    __slots__ = ("_loop", "_budget", "_waiting", "_deadline", "_polling", "_misses", "_skipped")

    def __init__(self, budget_s: float, waiting: Callable[[], bool]) -> None:
        self._loop = asyncio.get_running_loop()
        self._budget = budget_s
        self._waiting = waiting
        self._deadline = 0.0
        self._polling = False
        self._misses = 0
        self._skipped = 0

    @property
    def polling(self) -> bool:
        return self._polling

    def arm(self) -> None:
        """Poll for up to the budget from now (a no-op with a budget of 0)."""
        if self._budget <= 0:
            return
        if self._polling:
            self._misses = 0  # armed again by what came while it polled
        elif self._misses >= MISSES:
            self._skipped += 1
            if self._skipped < PROBE_EVERY:
                return
            self._skipped = 0
        self._deadline = time.monotonic() + self._budget
        if not self._polling:
            self._polling = True
            self._loop.call_soon(self._turn)

    def _turn(self) -> None:
        if not self._waiting():
            self._polling = False
            self._misses = 0
        elif time.monotonic() >= self._deadline:
            self._polling = False
            self._misses += 1
        else:
            os.sched_yield()
            self._loop.call_soon(self._turn)
