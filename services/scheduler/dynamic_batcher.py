"""Triton's dynamic batcher: requests of one model version gathered into batches.

A free instance takes a batch at once when the queue holds a full one (``max_batch_size``
or a preferred size); otherwise it waits until the oldest request has waited
``max_queue_delay_microseconds``, then takes what there is. Requests keep their arrival
order, so ``preserve_ordering`` holds by construction. An instance counts as free with
no batch in flight; a second batch is sent ahead to a busy instance only when a full one
is waiting, so waiting requests are not split into small batches.

Batch sizes count the batch dimension (dim 0) of each request's first input. Priority
levels and queue policies are the scheduler issue's; this batcher is FIFO.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from despina.common.batching import BatchRules, batch_size, plan_batch
from despina.services.scheduler.default import DefaultScheduler
from despina.services.scheduler.interface import Pending, Slot


def batch_size_of(pending: Pending) -> int:
    return batch_size(pending.request)


class DynamicBatcher(DefaultScheduler):
    """The default scheduler's queue and instances, with batches formed as above. Not
    thread-safe: used from the scheduler's loop only. ``wake`` re-runs this model's
    dispatch when the queue delay of the oldest request runs out."""

    def __init__(self, rules: BatchRules, wake: Callable[[], None]) -> None:
        super().__init__()
        self.arrivals: deque[float] = deque()
        self.max_batch_size = rules.max_batch_size
        self.delay = rules.delay_s
        self.preferred = list(rules.preferred)
        self._wake = wake
        self._timer: asyncio.TimerHandle | None = None

    def enqueue(self, pending: Pending) -> None:
        super().enqueue(pending)
        self.arrivals.append(time.monotonic())

    def _take(self, count: int) -> list[Pending]:
        batch = [self.queue.popleft() for _ in range(count)]
        for _ in range(count):
            self.arrivals.popleft()
        return batch

    def next_batches(self) -> list[tuple[Slot, list[Pending]]]:
        out: list[tuple[Slot, list[Pending]]] = []
        for depth in (0, 1):
            for slot in self.slots:
                if not self.queue or slot.busy != depth:
                    continue
                sizes = [batch_size_of(p) for p in self.queue]
                count, full = plan_batch(sizes, self.max_batch_size, self.preferred)
                waited = time.monotonic() - self.arrivals[0]
                if not full and (depth > 0 or waited < self.delay):
                    continue
                slot.busy += 1
                out.append((slot, self._take(count)))
        self._arm_timer()
        return out

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.queue and any(s.busy == 0 for s in self.slots):
            remaining = self.delay - (time.monotonic() - self.arrivals[0])
            self._timer = asyncio.get_running_loop().call_later(max(0.0, remaining), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._wake()

    def drain_queue(self) -> list[Pending]:
        self.arrivals.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return super().drain_queue()
