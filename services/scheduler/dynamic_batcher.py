"""Triton's dynamic batcher: requests of one model version gathered into batches.

A free instance takes a batch at once when the queue holds a full one (``max_batch_size``
or a preferred size); otherwise it waits until the oldest request has waited
``max_queue_delay_microseconds``, then takes what there is. Requests keep their arrival
order, so ``preserve_ordering`` holds by construction. An instance counts as free with
no batch in flight; a second batch is sent ahead to a busy instance only when a full one
is waiting, so waiting requests are not split into small batches.

The rules, the queue and the timer are ``common.batching.Batcher``'s (a backend host
batches its direct requests with the same class); this scheduler adds the instances.
Batch sizes count the batch dimension (dim 0) of each request's first input. Priority
levels and queue policies are the scheduler issue's; this batcher is FIFO.
"""

from __future__ import annotations

from collections.abc import Callable

from despina.common.batching import Batcher, BatchRules, batch_size
from despina.services.scheduler.default import DefaultScheduler
from despina.services.scheduler.interface import Pending, Slot


class DynamicBatcher(DefaultScheduler):
    """The default scheduler's instances, with batches formed as above from a
    ``Batcher`` (the default scheduler's own queue stays empty). Not thread-safe: used
    from the scheduler's loop only. ``wake`` re-runs this model's dispatch when the
    queue delay of the oldest request runs out."""

    def __init__(self, rules: BatchRules, wake: Callable[[], None]) -> None:
        super().__init__()
        self.batcher: Batcher[Pending] = Batcher(rules, wake)

    def enqueue(self, pending: Pending) -> None:
        self.batcher.add(pending, batch_size(pending.request))

    def next_batches(self) -> list[tuple[Slot, list[Pending]]]:
        out: list[tuple[Slot, list[Pending]]] = []
        batcher = self.batcher
        start, order = self.turns()
        for depth in (0, 1):
            for k, slot in enumerate(order):
                if not batcher.items or slot.busy != depth:
                    continue
                count = batcher.due(may_wait_out=depth == 0)
                if not count:
                    continue
                slot.busy += 1
                out.append((slot, batcher.take(count)))
                self._start = start + k + 1
        if batcher.items and any(s.busy == 0 for s in self.slots):
            batcher.arm()
        else:
            batcher.disarm()
        return out

    def drain_queue(self) -> list[Pending]:
        return self.batcher.drain() + super().drain_queue()
