"""Triton's default scheduler: one request per execution, to any free instance, in
arrival order.

An instance counts as free while it has fewer than ``depth`` requests in flight: with
two, the backend host already holds the next request when it finishes one, so the
scheduler's round trip (completion in, next request out) is off the critical path. The
host still runs its requests one at a time, in order.
"""

from __future__ import annotations

from collections import deque

from despina.services.scheduler.interface import Pending, Slot


class DefaultScheduler:
    """Not thread-safe: used from the scheduler's loop only."""

    def __init__(self, depth: int = 2) -> None:
        self.queue: deque[Pending] = deque()
        self.slots: list[Slot] = []
        self.depth = depth

    def enqueue(self, pending: Pending) -> None:
        self.queue.append(pending)

    def next_batches(self) -> list[tuple[Slot, list[Pending]]]:
        out: list[tuple[Slot, list[Pending]]] = []
        if not self.queue:
            return out
        # Fill the least busy instance first, one request at a time, so work spreads
        # evenly before any instance gets a second request.
        for level in range(self.depth):
            for slot in self.slots:
                if not self.queue:
                    return out
                if slot.busy == level:
                    slot.busy += 1
                    out.append((slot, [self.queue.popleft()]))
        return out

    def completed(self, slot: Slot, count: int) -> None:
        slot.busy = max(0, slot.busy - count)

    def add_slot(self, slot: Slot) -> None:
        self.slots.append(slot)

    def remove_slots(self, host: object) -> list[Slot]:
        gone = [s for s in self.slots if s.host is host]
        self.slots = [s for s in self.slots if s.host is not host]
        return gone

    def drain_queue(self) -> list[Pending]:
        items = list(self.queue)
        self.queue.clear()
        return items

    @property
    def slot_count(self) -> int:
        return len(self.slots)
