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
        self._start = 0  # where the next search for a free instance begins

    def enqueue(self, pending: Pending) -> None:
        self.queue.append(pending)

    def next_batches(self) -> list[tuple[Slot, list[Pending]]]:
        out: list[tuple[Slot, list[Pending]]] = []
        queue = self.queue
        if not queue:
            return out
        # Fill the least busy instance first, one request at a time, so work spreads
        # evenly before any instance gets a second request.
        start, order = self.turns()
        for level in range(self.depth):
            for k, slot in enumerate(order):
                if not queue:
                    return out
                if slot.busy == level:
                    slot.busy += 1
                    out.append((slot, [queue.popleft()]))
                    self._start = start + k + 1
        return out

    def turns(self) -> tuple[int, list[Slot]]:
        """The instances in the order to look for a free one: starting after the one
        served last, so that among equally busy instances even one request at a time
        takes turns over them (and over the hosts that hold them). A caller that serves
        ``order[k]`` sets ``self._start = start + k + 1``."""
        slots = self.slots
        start = self._start % len(slots) if slots else 0
        return start, (slots[start:] + slots[:start] if start else slots)

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
