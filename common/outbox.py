"""What one wake of the loop produced, sent once per peer: ``Outbox`` gathers items per
peer and flushes them together on the next loop iteration, in groups of
``BURST_LIMIT`` while the wake goes on, or at once when its owner says so (``put(...,
now=True)``, the end of a ``gathering`` block); ``FrameList`` builds the frame list of
one outgoing message (docs/architecture.md#the-hot-path).

No ZeroMQ here: the stream hops (common/streams.py) use these too, and a backend host
needs nothing else of common/transport.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from despina.common import messages as m

log = logging.getLogger("despina.common.transport")

# A peer's items are sent as soon as this many are waiting, not only at the end of the
# loop iteration (processes overlap instead of taking turns): docs/architecture.md#burst-sends.
BURST_LIMIT = 4


class FrameList:
    """Builds the frame list of one outgoing message: frame 0 is the header, added last."""

    __slots__ = ("frames",)

    def __init__(self) -> None:
        self.frames: list = [b""]

    def add(self, buf: bytes | memoryview) -> int:
        self.frames.append(buf)
        return len(self.frames) - 1

    def inline(self, tensors: list[m.Tensor], buffers: list) -> None:
        """Point each tensor that has bytes in ``buffers`` (aligned; None: its data is
        already in shared memory) at a frame of this message holding them."""
        for tensor, buf in zip(tensors, buffers):
            if buf is not None:
                tensor.ref = m.Inline(self.add(buf))

    def finish(self, header: bytes) -> list:
        self.frames[0] = header
        return self.frames


class Outbox:
    """Collects items per peer during one loop iteration and flushes them together.

    ``flush`` is called with ``{peer: [items...]}`` once, soon after the first ``put``,
    and at once with ``{peer: items}`` whenever a peer's items reach ``limit``.
    ``burst=False`` (the speed path off, common/settings.py): every ``put`` is flushed at
    once, alone, and ``gathering`` gathers nothing.
    """

    def __init__(
        self, flush: Callable[[dict], None], limit: int = BURST_LIMIT, burst: bool = True
    ) -> None:
        self._flush_cb = flush
        self._pending: dict = {}
        self._loop = asyncio.get_running_loop()
        self._scheduled = False
        self._gathering = False
        self._limit = limit
        # ``with outbox.gathering:`` items put in the block are sent when it ends (or in
        # groups of ``limit``), not on the next loop iteration: for the handler of a
        # whole burst (a backend host), which knows when there is nothing more to gather.
        self.gathering = _Gathering(self)
        if not burst:
            self.put = self._put_alone  # type: ignore[method-assign]

    def put(self, peer: object, item: object, now: bool = False) -> None:
        """Queue ``item`` for ``peer``. ``now``: send it, and all that waits, at once (a
        caller that knows there is nothing more to gather: a frontend with one or two
        requests in flight), without a loop callback."""
        items = self._pending.get(peer)
        if items is None:
            self._pending[peer] = [item]
        else:
            items.append(item)
            if len(items) >= self._limit and not now:
                del self._pending[peer]
                try:
                    self._flush_cb({peer: items})
                except Exception:
                    log.exception("outbox flush failed")
                return
        if now:
            self._flush()
        elif not self._scheduled and not self._gathering:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _put_alone(self, peer: object, item: object, now: bool = False) -> None:
        """``put`` without bursts: ``item`` goes to ``peer`` at once, in a message of
        its own."""
        try:
            self._flush_cb({peer: [item]})
        except Exception:
            log.exception("outbox flush failed")

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        if pending:
            try:
                self._flush_cb(pending)
            except Exception:
                log.exception("outbox flush failed")


class _Gathering:
    """``Outbox.gathering``: a reusable context manager (no generator per burst)."""

    __slots__ = ("_outbox",)

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    def __enter__(self) -> None:
        self._outbox._gathering = True

    def __exit__(self, *_exc: object) -> None:
        outbox = self._outbox
        outbox._gathering = False
        if outbox._pending:
            outbox._flush()
