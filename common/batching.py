"""Triton's dynamic batching rules, shared by the scheduler's batcher and a backend host
batching its direct requests: what a model's config asks for, and how many queued
requests make the next batch. Pure functions and plain records."""

from __future__ import annotations

from dataclasses import dataclass

from despina.common import messages as m


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


def plan_batch(sizes: list[int], max_batch_size: int, preferred: list[int]) -> tuple[int, bool]:
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
