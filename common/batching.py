"""Triton's dynamic batching, shared by the scheduler's batcher and a backend host
batching its direct requests: the rules a model's config asks for, how many queued
requests make the next batch (pure functions, table-tested), and ``Batcher``, the one
queue-and-timer both use by composition."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from despina.common import messages as m

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BatchRules:
    max_batch_size: int
    delay_s: float  # max_queue_delay_microseconds
    preferred: tuple[int, ...]  # preferred_batch_size, sorted, within max_batch_size


def batch_rules(config: dict) -> BatchRules | None:
    """The dynamic batching a model asks for, from its config in Triton's JSON form (what
    both the scheduler and a Python instance process, which loads no protobuf, have);
    None when it asks for none or cannot batch (max_batch_size 0)."""
    batching = config.get("dynamic_batching")
    size = int(config.get("max_batch_size", 0))
    if batching is None or size <= 0:
        return None
    return BatchRules(
        size,
        int(batching.get("max_queue_delay_microseconds", 0)) / 1e6,
        tuple(
            sorted(int(p) for p in batching.get("preferred_batch_size", ()) if 0 < int(p) <= size)
        ),
    )


def batch_size(request: m.Infer) -> int:
    """The batch dimension (dim 0) of a request's first input."""
    inputs = request.inputs
    return inputs[0].shape[0] if inputs and inputs[0].shape else 1


def plan_batch(
    sizes: Sequence[int], max_batch_size: int, preferred: Sequence[int]
) -> tuple[int, bool]:
    """How many queued requests (sizes in queue order) make the next batch, and whether
    that batch is full (max size or a preferred size), so it need not wait. Pure."""
    total = count = 0
    best_preferred = 0
    for size in sizes:
        if total + size > max_batch_size:
            break
        total += size
        count += 1
        if total in preferred:
            best_preferred = count
    if count == 0 and sizes:
        return 1, True  # a single request larger than max_batch_size was refused earlier
    if total == max_batch_size or (count < len(sizes)):
        return count, True
    if best_preferred:
        return best_preferred, True
    return count, False


class Batcher(Generic[T]):
    """The one dynamic batcher: Triton's rules, the queue of what waits for a batch and
    the queue-delay timer, for one model (the scheduler's ``DynamicBatcher``) or one
    instance (a backend host batching its direct requests). Its owner decides when an
    instance is free and calls ``due``; ``wake`` is called when the oldest item has
    waited the queue delay, so the owner asks again. Items are whatever the owner queues
    (a ``Pending``, a request and its arrays); ``add`` takes each one's batch size, read
    once. Loop only: not safe across threads."""

    __slots__ = ("rules", "items", "sizes", "arrivals", "_wake", "_timer")

    def __init__(self, rules: BatchRules, wake: Callable[[], None]) -> None:
        self.rules = rules
        self.items: deque[T] = deque()
        self.sizes: deque[int] = deque()  # batch dimension of each item, aligned with items
        self.arrivals: deque[float] = deque()  # time.monotonic() of each item's arrival
        self._wake = wake
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: T, size: int) -> None:
        self.items.append(item)
        self.sizes.append(size)
        self.arrivals.append(time.monotonic())

    def due(self, may_wait_out: bool = True) -> int:
        """How many queued items make a batch to run now: a full one (the max or a
        preferred size) always; a partial one only when ``may_wait_out`` (the instance
        is free) and the oldest item has waited the queue delay. 0 when none is due."""
        if not self.items:
            return 0
        rules = self.rules
        count, full = plan_batch(self.sizes, rules.max_batch_size, rules.preferred)
        if full:
            return count
        if may_wait_out and time.monotonic() - self.arrivals[0] >= rules.delay_s:
            return count
        return 0

    def take(self, count: int) -> list[T]:
        """The ``count`` oldest items, out of the queue."""
        items, sizes, arrivals = self.items, self.sizes, self.arrivals
        for _ in range(count):
            sizes.popleft()
            arrivals.popleft()
        return [items.popleft() for _ in range(count)]

    def arm(self) -> None:
        """Call ``wake`` when the oldest queued item has waited the queue delay (at once
        if it already has); replaces the timer armed before. Nothing queued: no timer."""
        self.disarm()
        if self.items:
            remaining = self.rules.delay_s - (time.monotonic() - self.arrivals[0])
            self._timer = asyncio.get_running_loop().call_later(max(0.0, remaining), self._fire)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        self._wake()

    def remove(self, drop: Callable[[T], bool]) -> list[T]:
        """The queued items ``drop`` picks, out of the queue (cancelled requests); the
        others keep their order and their arrival times."""
        kept = [e for e in zip(self.items, self.sizes, self.arrivals) if not drop(e[0])]
        if len(kept) == len(self.items):
            return []
        dropped = [item for item in self.items if drop(item)]
        self.items = deque(e[0] for e in kept)
        self.sizes = deque(e[1] for e in kept)
        self.arrivals = deque(e[2] for e in kept)
        return dropped

    def drain(self) -> list[T]:
        """Every queued item, out of the queue, and the timer stopped (to fail them)."""
        self.disarm()
        return self.take(len(self.items))
