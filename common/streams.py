"""Framed messages over plain byte streams (unix sockets on one machine, TCP across
machines), driven by asyncio Protocols: the transport of the data-plane hops.

The framing carries the same multipart messages as the ZeroMQ sockets (frame 0 a
msgpack header, then tensor frames): ``u32 frame count, u32 length per frame``, then the
frames. A protocol parses every complete message that one ``data_received`` brought and
hands them to one callback, so a process still reacts once per wake (one thread wake-up
per hop, where libzmq takes three: docs/architecture.md#the-hot-path).

A peer's death closes its stream at once, so ``on_lost`` is how a process learns that a
peer is gone; TCP keepalive catches peers that vanish without closing (a cut network).

Limits: a peer that announces a message of more than ``MAX_FRAMES`` frames, a header
frame of more than ``MAX_HEADER_BYTES`` or a message of more than ``MAX_MESSAGE_BYTES``
(``DESPINA_MAX_MESSAGE_BYTES``) is cut off as soon as the announcement is read, before
anything is buffered for it; ``send`` refuses such a message (the caller reports it
undelivered) rather than have the peer drop the whole link.

Authentication: when ``DESPINA_CLUSTER_SECRET`` (or a file named by
``DESPINA_CLUSTER_SECRET_FILE``) is set, every TCP stream starts with a mutual
challenge-response before any message is accepted: the listener sends a random nonce,
the connecting side answers with its own nonce and HMAC-SHA256(secret, both nonces), and
the listener proves it knows the secret too. A peer that fails, or says nothing for
``HANDSHAKE_TIMEOUT_S``, is disconnected. Unix-socket streams need none (the socket
file's permissions guard them). Without a secret, TCP streams are open to whoever
reaches the port, and each TCP listener says so in the log when it starts.
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
# A message's whole size (frame 0 plus its tensor frames) and its header's. Tensors cross
# a TCP hop inline, so a message may hold a burst of requests' inputs: room for that,
# not for a peer's claim of terabytes. DESPINA_MAX_MESSAGE_BYTES sets it at start-up
# (common/settings.py ``ProcessSettings.apply``), before the first link.
MAX_MESSAGE_BYTES = 1 << 31
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES  # one frame can be no larger than its message
MAX_HEADER_BYTES = 1 << 26
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


def parse_endpoint(endpoint: str, any_port: bool = False) -> tuple[str, int]:
    """``unix:///path`` or ``ipc:///path`` -> (path, 0); ``tcp://host:port`` -> (host,
    port), port 0 (any free port) only where ``any_port`` (a listener). Raises ValueError
    naming the endpoint otherwise."""
    if endpoint.startswith(("unix://", "ipc://")):
        return endpoint.split("://", 1)[1], 0
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[6:].rpartition(":")
        if host and port.isdigit() and (int(port) > 0 or any_port):
            return host.strip("[]"), int(port)
    raise ValueError(f"endpoint '{endpoint}' is neither unix:///path nor tcp://host:port")


# --- authentication of TCP streams --------------------------------------------------

SECRET_ENV = "DESPINA_CLUSTER_SECRET"
SECRET_FILE_ENV = "DESPINA_CLUSTER_SECRET_FILE"
HANDSHAKE_TIMEOUT_S = 5.0
_MAGIC = b"DSPNAUTH"
_NONCE = 16
_MAC = 32
CHALLENGE_BYTES = len(_MAGIC) + _NONCE
ANSWER_BYTES = _NONCE + _MAC


def cluster_secret() -> bytes | None:
    """The shared secret of this cell's TCP links: ``DESPINA_CLUSTER_SECRET``, else the
    contents of the file ``DESPINA_CLUSTER_SECRET_FILE`` names (trailing whitespace
    stripped), else None (unauthenticated). Raises OSError when that file is unreadable."""
    value = os.environ.get(SECRET_ENV, "")
    if value:
        return value.encode()
    path = os.environ.get(SECRET_FILE_ENV, "")
    if path:
        with open(path, "rb") as f:
            secret = f.read().rstrip()
        if not secret:
            raise OSError(f"{SECRET_FILE_ENV} names an empty file: {path}")
        return secret
    return None


# hmac and hashlib are imported where a secret is used: they load OpenSSL (~4 MiB of
# RSS in every process), which a server without a cluster secret never needs.


def _mac(secret: bytes, role: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    import hashlib
    import hmac

    return hmac.new(secret, role + nonce_s + nonce_c, hashlib.sha256).digest()


def _same(a: bytes, b: bytes) -> bool:
    """Constant-time comparison (hmac.compare_digest)."""
    import hmac

    return hmac.compare_digest(a, b)


def challenge() -> tuple[bytes, bytes]:
    """A listener's first bytes on a TCP stream, and the nonce they carry."""
    nonce = os.urandom(_NONCE)
    return _MAGIC + nonce, nonce


def answer(secret: bytes, challenge_bytes: bytes) -> tuple[bytes, bytes]:
    """The connecting side's answer to a challenge, and the proof it must get back.
    Raises ConnectionRefusedError when the bytes are no challenge (the listener has no
    secret set, or is no Despina stream)."""
    if len(challenge_bytes) != CHALLENGE_BYTES or not challenge_bytes.startswith(_MAGIC):
        raise ConnectionRefusedError(
            f"the peer sent no authentication challenge: is it running without {SECRET_ENV}?"
        )
    nonce_s = challenge_bytes[len(_MAGIC) :]
    nonce_c = os.urandom(_NONCE)
    return nonce_c + _mac(secret, b"client", nonce_s, nonce_c), _mac(
        secret, b"server", nonce_s, nonce_c
    )


def check_answer(secret: bytes, nonce_s: bytes, answer_bytes: bytes) -> bytes | None:
    """The listener's proof to send back, or None when the answer is wrong."""
    nonce_c, mac = answer_bytes[:_NONCE], answer_bytes[_NONCE:ANSWER_BYTES]
    if not _same(mac, _mac(secret, b"client", nonce_s, nonce_c)):
        return None
    return _mac(secret, b"server", nonce_s, nonce_c)


def authenticate_blocking(sock: socket.socket, secret: bytes) -> None:
    """The connecting side's handshake on a blocking socket (the Python launcher's).
    Raises OSError (ConnectionRefusedError when the listener is not convinced or does
    not convince)."""
    got = b""
    while len(got) < CHALLENGE_BYTES:
        chunk = sock.recv(CHALLENGE_BYTES - len(got))
        if not chunk:
            raise ConnectionRefusedError("the peer closed the stream during authentication")
        got += chunk
    reply, proof = answer(secret, got)
    sock.sendall(reply)
    got = b""
    while len(got) < _MAC:
        chunk = sock.recv(_MAC - len(got))
        if not chunk:
            raise ConnectionRefusedError("the peer refused this process's cluster secret")
        got += chunk
    if not _same(got, proof):
        raise ConnectionRefusedError("the peer does not know the cluster secret")


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
        *,
        secret: bytes | None = None,
        listener: bool = False,
    ) -> None:
        self._on_burst = on_burst
        self._on_lost = on_lost
        self._buf = bytearray()
        self._need = 0  # bytes of the message being received, 0 = unknown yet
        self.transport: asyncio.Transport | None = None
        self.peer: object = None  # what the owner knows this stream as
        self.closed = False
        # The handshake (TCP with a cluster secret): until it is done no message is parsed.
        # The transport reads ``data_received`` once, when it is created, so the handshake
        # is in front of it from the start; streams without one pay nothing per read.
        self._secret = secret
        self._listener = listener
        self._hs = b""  # handshake bytes received so far
        self._nonce = b""  # the listener's nonce, or the proof the connecting side expects
        self._timer: asyncio.TimerHandle | None = None
        self.authenticated: asyncio.Future | None = None
        if secret is not None:
            self.authenticated = asyncio.get_running_loop().create_future()
            self.data_received = self._handshake_received  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _keepalive(transport.get_extra_info("socket"))
        if self._secret is not None:
            self._timer = asyncio.get_running_loop().call_later(
                HANDSHAKE_TIMEOUT_S, self._refuse, "it did not authenticate in time"
            )
            if self._listener:
                hello, self._nonce = challenge()
                transport.write(hello)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        auth = self.authenticated
        if auth is not None and (not auth.done() or auth.exception() is not None):
            if not auth.done():
                auth.set_exception(
                    ConnectionRefusedError("the peer closed the stream during authentication")
                )
                auth.exception()  # retrieved: nobody may be waiting (a listener's stream)
            if self._listener:
                return  # its owner never saw this stream
        if self._on_lost is not None:
            self._on_lost(self)

    def _handshake_received(self, data: bytes) -> None:
        auth = self.authenticated
        assert auth is not None and self._secret is not None
        if auth.done():
            FramedProtocol.data_received(self, data)
            return
        self._hs += data
        need = ANSWER_BYTES if self._listener else CHALLENGE_BYTES
        if not self._nonce or self._listener:
            if len(self._hs) < need:
                return
            got, rest = self._hs[:need], self._hs[need:]
            self._hs = rest
            if self._listener:
                proof = check_answer(self._secret, self._nonce, got)
                if proof is None:
                    self._refuse("it does not know the cluster secret")
                    return
                assert self.transport is not None
                self.transport.write(proof)
                self._authenticated()
                if rest:
                    FramedProtocol.data_received(self, rest)
                return
            try:
                reply, self._nonce = answer(self._secret, got)
            except ConnectionRefusedError as exc:
                self._refuse(str(exc))
                return
            assert self.transport is not None
            self.transport.write(reply)
        if len(self._hs) < _MAC:
            return
        got, rest = self._hs[:_MAC], self._hs[_MAC:]
        if not _same(got, self._nonce):
            self._refuse("it does not know the cluster secret")
            return
        self._authenticated()
        if rest:
            FramedProtocol.data_received(self, rest)

    def _authenticated(self) -> None:
        self._hs = self._nonce = b""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        assert self.authenticated is not None
        self.authenticated.set_result(None)

    def _refuse(self, why: str) -> None:
        """End a stream whose handshake failed; nothing it sent reaches the owner."""
        self._timer = None
        peer = None if self.transport is None else self.transport.get_extra_info("peername")
        log.warning(
            "refusing the TCP stream %s %s: %s", "from" if self._listener else "to", peer, why
        )
        auth = self.authenticated
        if auth is not None and not auth.done():
            auth.set_exception(ConnectionRefusedError(f"authentication failed: {why}"))
            auth.exception()
        if self.transport is not None:
            self.transport.abort()

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
            if count > MAX_FRAMES or count == 0:
                self._fail(f"a message claims {count} frames")
                return
            head = 4 + 4 * count
            if end - pos < head:
                break
            lengths = _lengths(count).unpack_from(data, pos + 4)
            total = head + sum(lengths)
            if total > MAX_MESSAGE_BYTES + head or lengths[0] > MAX_HEADER_BYTES:
                self._fail(
                    f"a message claims {total - head} bytes (header {lengths[0]}); the limit "
                    f"is {MAX_MESSAGE_BYTES} (header {MAX_HEADER_BYTES})"
                )
                return
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
        self._buf.clear()
        self._need = 0
        if self.transport is not None:
            self.transport.abort()  # what it sent after this is not read

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
        total = sum(sizes)
        if total < 65536:
            transport.write(header + b"".join(frames))
        elif total > MAX_MESSAGE_BYTES or len(frames) > MAX_FRAMES:
            log.error(
                "not sending a message of %d bytes in %d frames: the limit is %d bytes",
                total,
                len(frames),
                MAX_MESSAGE_BYTES,
            )
            return False
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
    """Listen on ``endpoint``; each accepted stream gets its own FramedProtocol. A TCP
    endpoint asks each peer for the cluster secret when one is set (its streams reach
    ``on_burst``/``on_made`` only once authenticated) and logs a warning when none is.
    A unix socket is created readable and writable by this user only; a TCP port 0 is
    any free port (``bound_endpoint`` tells which)."""
    loop = asyncio.get_running_loop()
    where, port = parse_endpoint(endpoint, any_port=True)
    tcp = endpoint.startswith("tcp://")
    secret = cluster_secret() if tcp else None
    if tcp and secret is None:
        log.warning(
            "TCP links on %s are unauthenticated: any process that reaches this port can "
            "join as a backend host or frontend; set %s (or %s) on every service",
            endpoint,
            SECRET_ENV,
            SECRET_FILE_ENV,
        )

    def factory() -> FramedProtocol:
        proto = FramedProtocol(on_burst, on_lost, secret=secret, listener=True)
        if on_made is not None:
            original = proto.connection_made

            def made(transport: asyncio.BaseTransport) -> None:
                original(transport)
                if proto.authenticated is None:
                    on_made(proto)
                else:
                    proto.authenticated.add_done_callback(
                        lambda f: f.cancelled() or f.exception() or on_made(proto)
                    )

            proto.connection_made = made  # type: ignore[method-assign]
        return proto

    if not tcp:
        if os.path.exists(where):
            os.unlink(where)
        old = os.umask(0o077)
        try:
            return await loop.create_unix_server(factory, where)
        finally:
            os.umask(old)
    return await loop.create_server(factory, where, port, reuse_address=True)


def bound_endpoint(endpoint: str, server: asyncio.AbstractServer) -> str:
    """``endpoint`` as ``server`` (``serve``'s) listens on it: a TCP port 0 replaced by
    the port the kernel picked; any other endpoint as it is."""
    if not endpoint.startswith("tcp://") or not endpoint.endswith(":0"):
        return endpoint
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return f"{endpoint[:-2]}:{port}"


async def connect(
    endpoint: str,
    on_burst: Callable[[FramedProtocol, list[list]], None],
    on_lost: Callable[[FramedProtocol], None] | None = None,
) -> FramedProtocol:
    """Open one stream to ``endpoint``. Raises OSError when nobody listens there, or
    (ConnectionRefusedError) when a TCP peer and this process do not prove to each other
    that they hold the same cluster secret."""
    loop = asyncio.get_running_loop()
    where, port = parse_endpoint(endpoint)
    if not port:
        _, proto = await loop.create_unix_connection(
            lambda: FramedProtocol(on_burst, on_lost), where
        )
        return proto
    secret = cluster_secret()
    _, proto = await loop.create_connection(
        lambda: FramedProtocol(on_burst, on_lost, secret=secret), where, port
    )
    if proto.authenticated is not None:
        try:
            await asyncio.wait_for(asyncio.shield(proto.authenticated), HANDSHAKE_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            proto._on_lost = None  # never connected, as far as its owner knows
            proto.close()
            raise ConnectionRefusedError(f"{endpoint}: {exc or 'no authentication'}") from None
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
