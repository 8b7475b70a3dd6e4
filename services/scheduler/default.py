"""Triton's default scheduler: one request per execution, to any free instance, in
arrival order."""

from __future__ import annotations

from collections import deque

from despina.services.scheduler.interface import Pending, Slot


class DefaultScheduler:
    """Not thread-safe: used from the scheduler's loop only."""

    def __init__(self, max_queue: int = 100_000) -> None:
        self.queue: deque[Pending] = deque()
        self.slots: list[Slot] = []
        self.max_queue = max_queue

    def enqueue(self, pending: Pending) -> None:
        self.queue.append(pending)

    def next_batches(self) -> list[tuple[Slot, list[Pending]]]:
        out: list[tuple[Slot, list[Pending]]] = []
        if not self.queue:
            return out
        for slot in self.slots:
            if not self.queue:
                break
            if slot.busy == 0:
                slot.busy = 1
                out.append((slot, [self.queue.popleft()]))
        return out

    def completed(self, slot: Slot, count: int) -> None:
        slot.busy = max(0, slot.busy - count)

    def add_slot(self, slot: Slot) -> None:
        self.slots.append(slot)

    def remove_slots(self, host_identity: bytes) -> list[Slot]:
        gone = [s for s in self.slots if s.host_identity == host_identity]
        self.slots = [s for s in self.slots if s.host_identity != host_identity]
        return gone

    def drain_queue(self) -> list[Pending]:
        items = list(self.queue)
        self.queue.clear()
        return items

    @property
    def slot_count(self) -> int:
        return len(self.slots)
