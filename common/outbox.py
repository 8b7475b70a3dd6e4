"""What one wake of the loop produced, sent once per peer: ``Outbox`` gathers items per
peer and flushes them together on the next loop iteration; ``FrameList`` builds the frame
list of one outgoing message (DESIGN.md, "The hot path").

No ZeroMQ here: the stream hops (common/streams.py) use these too, and a backend host
needs nothing else of common/transport.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("despina.common.transport")


class FrameList:
    """Builds the frame list of one outgoing message: frame 0 is the header, added last."""

    __slots__ = ("frames",)

    def __init__(self) -> None:
        self.frames: list = [b""]

    def add(self, buf: bytes | memoryview) -> int:
        self.frames.append(buf)
        return len(self.frames) - 1

    def finish(self, header: bytes) -> list:
        self.frames[0] = header
        return self.frames


class Outbox:
    """Collects items per peer during one loop iteration and flushes them together.

    ``flush`` is called with ``{peer: [items...]}`` once, soon after the first ``put``.
    """

    def __init__(self, flush: Callable[[dict], None]) -> None:
        self._flush_cb = flush
        self._pending: dict = {}
        self._loop = asyncio.get_running_loop()
        self._scheduled = False

    def put(self, peer: object, item: object) -> None:
        items = self._pending.get(peer)
        if items is None:
            self._pending[peer] = [item]
        else:
            items.append(item)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        if pending:
            try:
                self._flush_cb(pending)
            except Exception:
                log.exception("outbox flush failed")
