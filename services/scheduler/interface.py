"""The small protocol every per-model scheduler satisfies (default, dynamic batcher,
sequence batcher, ensemble), and the records they pass around."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from despina.common import messages as m


@dataclass(eq=False, slots=True)
class Slot:
    """One model instance on one backend host. ``busy`` counts requests in flight on it."""

    host: Any  # the backend host's stream (streams.FramedProtocol): where batches go
    model: str
    version: str
    index: int
    busy: int = 0


@dataclass(eq=False, slots=True)
class Pending:
    """A request the scheduler holds: where it came from and its inline tensor bytes
    (aligned with ``request.inputs``; None for shared-memory refs)."""

    frontend: Any  # the frontend: ZeroMQ identity (bytes) or its stream
    request: m.Infer
    buffers: list = field(default_factory=list)
    retried: bool = False  # sent again after its host was lost (dispatch.fail_host)


class ModelScheduler(Protocol):
    def enqueue(self, pending: Pending) -> None: ...

    def next_batches(self) -> list[tuple[Slot, list[Pending]]]:
        """Pair queued requests with free instances; the caller sends them."""
        ...

    def completed(self, slot: Slot, count: int) -> None:
        """``count`` executions (batches) finished on ``slot``."""
        ...

    def add_slot(self, slot: Slot) -> None: ...

    def remove_slots(self, host: Any) -> list[Slot]: ...

    def drain_queue(self) -> list[Pending]:
        """Take every queued request out (to fail them)."""
        ...

    @property
    def slot_count(self) -> int: ...
