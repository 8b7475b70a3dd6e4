"""ZeroMQ sockets driven from the asyncio event loop, with no ``await`` per message.

``SocketDriver`` registers the socket's file descriptor with ``loop.add_reader``; on each
wake it drains every ready message with ``NOBLOCK`` and hands the whole burst to one
callback. ZeroMQ's FD is edge-triggered and a send can consume the edge, so after every
send (and after each burst) ``EVENTS`` is checked again and a drain re-scheduled if input
is waiting. ``Outbox`` (common/outbox.py, re-exported here) gathers what a wake
produced and flushes it once per loop iteration, so each peer gets one message per wake
(docs/architecture.md#the-hot-path).

With a cluster secret (common/streams.py, ``cluster_secret``), a ``tcp://`` ZeroMQ socket
runs CURVE with the scheduler's key pair derived from the secret (``secure``): a peer
that does not hold the secret cannot know the scheduler's public key, so its handshake
fails before any message is delivered; the traffic is encrypted as well.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import zmq

from despina.common.outbox import FrameList, Outbox

__all__ = ["FrameList", "Outbox", "SocketDriver", "configure", "make_context", "secure"]

log = logging.getLogger(__name__)

Frames = list  # list of bytes | memoryview | zmq.Frame

# Large frames are sent without a copy; below this a copy is cheaper than the
# bookkeeping (docs/architecture.md#the-hot-path).
ZERO_COPY_THRESHOLD = 64 * 1024

HEARTBEAT_OPTIONS = {
    # libzmq's own heartbeats run on its I/O thread, so they keep flowing while Python is
    # busy; they drop a TCP connection to a peer that vanished without closing it.
    zmq.HEARTBEAT_IVL: 1000,
    zmq.HEARTBEAT_TIMEOUT: 5000,
}


def make_context() -> zmq.Context:
    return zmq.Context.instance()


def configure(sock: zmq.Socket) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    for opt, value in HEARTBEAT_OPTIONS.items():
        sock.setsockopt(opt, value)
    return sock


def _curve_keys(secret: bytes) -> tuple[bytes, bytes]:
    """The scheduler's CURVE (public, secret) keys, Z85, derived from the cluster secret."""
    import hashlib
    import hmac

    from zmq.utils import z85

    secret_key = z85.encode(hmac.new(secret, b"despina-zmq-curve", hashlib.sha256).digest())
    return zmq.curve_public(secret_key), secret_key


def secure(sock: zmq.Socket, endpoint: str, *, server: bool) -> bool:
    """Turn CURVE on for ``sock`` when ``endpoint`` is TCP and a cluster secret is set
    (before bind/connect). True when it did; False leaves the socket as it was (an
    ``ipc://`` endpoint, guarded by its file's permissions, or no secret: the server
    logs that its TCP endpoint is unauthenticated). Raises OSError when the secret file
    cannot be read."""
    from despina.common.streams import SECRET_ENV, cluster_secret

    if not endpoint.startswith("tcp://"):
        return False
    secret = cluster_secret()
    if secret is None:
        if server:
            log.warning(
                "the ZeroMQ endpoint %s is unauthenticated: any process that reaches it can "
                "send requests as a frontend; set %s on every service",
                endpoint,
                SECRET_ENV,
            )
        return False
    public, secret_key = _curve_keys(secret)
    if server:
        sock.curve_server = True
        sock.curve_secretkey = secret_key
        sock.curve_publickey = public
    else:
        sock.curve_serverkey = public
        client_public, client_secret = zmq.curve_keypair()
        sock.curve_publickey = client_public
        sock.curve_secretkey = client_secret
    return True


class SocketDriver:
    """Owns one socket's reading side on the loop; sends go through ``send``.

    ``on_burst`` receives a list of multipart messages (each a list of frames) and must
    not block for long. Not thread-safe: use from the loop's thread only.
    """

    def __init__(
        self,
        sock: zmq.Socket,
        on_burst: Callable[[list[list]], None] | None,
        *,
        copy: bool = True,
        max_burst: int = 1024,
    ) -> None:
        self.sock = sock
        self._on_burst = on_burst
        self._copy = copy
        self._max_burst = max_burst
        self._loop = asyncio.get_running_loop()
        self._scheduled = False
        self._closed = False
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        if on_burst is not None:
            self._loop.add_reader(self._fd, self._drain)
            # Messages may already be queued before the reader was added.
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        if self._closed or self._on_burst is None:
            return
        sock = self.sock
        burst: list[list] = []
        try:
            while len(burst) < self._max_burst:
                burst.append(sock.recv_multipart(zmq.NOBLOCK, copy=self._copy))
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            if exc.errno == zmq.ETERM or self._closed:
                return
            raise
        if burst:
            try:
                self._on_burst(burst)
            except Exception:
                log.exception("handler failed on a burst of %d messages", len(burst))
        self._recheck()

    def _recheck(self) -> None:
        if self._on_burst is not None and not self._closed:
            try:
                if cast(int, self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    self._schedule()
            except zmq.ZMQError:
                pass

    def send(self, frames: Frames) -> bool:
        """Send one multipart message without blocking; False when it could not be queued
        (peer gone or high-water mark reached): the caller decides what that means."""
        copy = all(not isinstance(f, memoryview) or f.nbytes < ZERO_COPY_THRESHOLD for f in frames)
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=copy)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            log.warning("send failed: %s", exc)
            return False
        finally:
            self._recheck()

    def close(self, linger_ms: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._on_burst is not None:
            try:
                self._loop.remove_reader(self._fd)
            except Exception:
                pass
        self.sock.close(linger=linger_ms)
