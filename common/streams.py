"""Framed messages over plain byte streams (unix sockets on one machine, TCP across
machines), driven by asyncio Protocols: the transport of the data-plane hops.

The framing carries the same multipart messages as the ZeroMQ sockets (frame 0 a
msgpack header, then tensor frames): ``u32 frame count, u32 length per frame``, then the
frames. A protocol parses every complete message that one ``data_received`` brought and
hands them to one callback, so a process still reacts once per wake (DESIGN.md, "The hot
path": these hops were ~30 % faster than libzmq at c=8, one thread wake-up per hop
instead of three).

A peer's death closes its stream at once, so ``on_lost`` is how a process learns that a
peer is gone; TCP keepalive catches peers that vanish without closing (a cut network).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import struct
from collections.abc import Callable

log = logging.getLogger(__name__)

_U32 = struct.Struct("<I")
MAX_FRAMES = 1 << 16
MAX_FRAME_BYTES = 1 << 34
# Past this much unsent data to one peer the peer is treated as stuck.
MAX_WRITE_BUFFER = 1 << 31


@functools.lru_cache(maxsize=64)
def _lengths(count: int) -> struct.Struct:
    """The frame lengths of a message of ``count`` frames."""
    return struct.Struct(f"<{count}I")


@functools.lru_cache(maxsize=64)
def _header(count: int) -> struct.Struct:
    """A message's head: its frame count, then each frame's length."""
    return struct.Struct(f"<I{count}I")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``unix:///path`` or ``ipc:///path`` -> (path, 0); ``tcp://host:port`` -> (host,
    port). Raises ValueError naming the endpoint otherwise."""
    if endpoint.startswith(("unix://", "ipc://")):
        return endpoint.split("://", 1)[1], 0
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[6:].rpartition(":")
        if host and port.isdigit() and int(port) > 0:
            return host.strip("[]"), int(port)
    raise ValueError(f"endpoint '{endpoint}' is neither unix:///path nor tcp://host:port")


def _keepalive(sock: socket.socket | None) -> None:
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 5)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class FramedProtocol(asyncio.Protocol):
    """One stream carrying framed multipart messages both ways. Loop thread only."""

    def __init__(
        self,
        on_burst: Callable[[FramedProtocol, list[list]], None],
        on_lost: Callable[[FramedProtocol], None] | None = None,
    ) -> None:
        self._on_burst = on_burst
        self._on_lost = on_lost
        self._buf = bytearray()
        self._need = 0  # bytes of the message being received, 0 = unknown yet
        self.transport: asyncio.Transport | None = None
        self.peer: object = None  # what the owner knows this stream as
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _keepalive(transport.get_extra_info("socket"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._on_lost is not None:
            self._on_lost(self)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            # The rest of a message that came in pieces: parse once it is all here.
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        self._need = 0
        burst: list[list] = []
        pos = 0
        end = len(data)
        while end - pos >= 4:
            (count,) = _U32.unpack_from(data, pos)
            if count > MAX_FRAMES:
                self._fail(f"a message claims {count} frames")
                return
            head = 4 + 4 * count
            if end - pos < head:
                break
            lengths = _lengths(count).unpack_from(data, pos + 4)
            total = head + sum(lengths)
            if end - pos < total:
                self._need = total
                break
            offset = pos + head
            frames = []
            for length in lengths:
                frames.append(data[offset : offset + length])
                offset += length
            burst.append(frames)
            pos += total
        if pos < end:
            buf += memoryview(data)[pos:]
        if burst:
            try:
                self._on_burst(self, burst)
            except Exception:
                log.exception("handler failed on a burst of %d messages", len(burst))

    def _fail(self, why: str) -> None:
        log.error("closing a stream that broke the framing: %s", why)
        if self.transport is not None:
            self.transport.close()

    def send(self, frames: list) -> bool:
        """Queue one message; False when the stream is closed or the peer is stuck."""
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return False
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.error(
                "peer stopped reading (%d bytes unsent); closing the stream",
                transport.get_write_buffer_size(),
            )
            transport.close()
            return False
        sizes = [len(f) if type(f) is bytes else memoryview(f).nbytes for f in frames]
        header = _header(len(frames)).pack(len(frames), *sizes)
        if sum(sizes) < 65536:
            transport.write(header + b"".join(frames))
        else:
            transport.writelines([header, *frames])
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(
    endpoint: str,
    on_burst: Callable[[FramedProtocol, list[list]], None],
    on_lost: Callable[[FramedProtocol], None] | None = None,
    on_made: Callable[[FramedProtocol], None] | None = None,
) -> asyncio.AbstractServer:
    """Listen on ``endpoint``; each accepted stream gets its own FramedProtocol."""
    loop = asyncio.get_running_loop()

    def factory() -> FramedProtocol:
        proto = FramedProtocol(on_burst, on_lost)
        if on_made is not None:
            original = proto.connection_made

            def made(transport: asyncio.BaseTransport) -> None:
                original(transport)
                on_made(proto)

            proto.connection_made = made  # type: ignore[method-assign]
        return proto

    where, port = parse_endpoint(endpoint)
    if not port:
        if os.path.exists(where):
            os.unlink(where)
        return await loop.create_unix_server(factory, where)
    return await loop.create_server(factory, where, port, reuse_address=True)


async def connect(
    endpoint: str,
    on_burst: Callable[[FramedProtocol, list[list]], None],
    on_lost: Callable[[FramedProtocol], None] | None = None,
) -> FramedProtocol:
    """Open one stream to ``endpoint``. Raises OSError when nobody listens there."""
    loop = asyncio.get_running_loop()
    where, port = parse_endpoint(endpoint)
    if not port:
        _, proto = await loop.create_unix_connection(
            lambda: FramedProtocol(on_burst, on_lost), where
        )
    else:
        _, proto = await loop.create_connection(
            lambda: FramedProtocol(on_burst, on_lost), where, port
        )
    return proto


class LazyStream:
    """A stream to one endpoint, opened on first use. Messages sent while it connects
    wait in order. When it cannot connect, or a message cannot be written, that
    message's ``tag`` is handed to ``on_undelivered`` so the sender can report it."""

    def __init__(
        self,
        endpoint: str,
        on_burst: Callable[[FramedProtocol, list[list]], None],
        on_undelivered: Callable[[list], None],
        on_lost: Callable[[FramedProtocol], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._on_burst = on_burst
        self._on_undelivered = on_undelivered
        self._on_lost = on_lost
        self._proto: FramedProtocol | None = None
        self._waiting: list[tuple[list, object]] | None = None

    def send(self, frames: list, tag: object = None) -> None:
        if self._proto is not None and not self._proto.closed:
            if not self._proto.send(frames):
                self._on_undelivered([tag])
            return
        if self._waiting is None:
            self._waiting = [(frames, tag)]
            asyncio.get_running_loop().create_task(self._open())
        else:
            self._waiting.append((frames, tag))

    async def _open(self) -> None:
        try:
            self._proto = await connect(self.endpoint, self._on_burst, self._on_lost)
        except OSError as exc:
            log.error("cannot reach %s: %s", self.endpoint, exc)
            self._proto = None
        waiting, self._waiting = self._waiting or [], None
        failed = [
            tag for frames, tag in waiting if self._proto is None or not self._proto.send(frames)
        ]
        if failed:
            self._on_undelivered(failed)

    @property
    def link(self) -> FramedProtocol | None:
        return self._proto

    def close(self) -> None:
        if self._proto is not None:
            self._proto.close()
