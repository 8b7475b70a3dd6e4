"""``H2Server``: listens, keeps the methods and limits every connection shares, counts the
calls in flight, and stops gracefully."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from despina.services.frontend.grpc.h2.calls import STREAM_FIELDS, Method, MethodHandler
from despina.services.frontend.grpc.h2.connection import H2Connection

# Streams open at once on a connection (SETTINGS_MAX_CONCURRENT_STREAMS, advertised; the
# flag --grpc-http2-max-concurrent-streams): a HEADERS past it gets REFUSED_STREAM.
MAX_CONCURRENT_STREAMS_DEFAULT = 1000


class H2Server:
    """Listens on (host, port) and serves gRPC calls with ``handlers`` (by full method
    path, ``/package.Service/Method``). ``max_concurrent_streams``: the streams one
    connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS)."""

    def __init__(
        self,
        handlers: dict[str, MethodHandler],
        max_receive: int,
        max_send: int,
        max_concurrent_streams: int = MAX_CONCURRENT_STREAMS_DEFAULT,
        forward: re.Pattern[str] | None = None,
        connection_state: Callable[[], object] | None = None,
    ) -> None:
        """``connection_state``: makes each connection's object for the methods'
        ``start`` (``MethodHandler``), when the connection opens."""
        self.methods = {path: Method(h) for path, h in handlers.items()}
        self.connection_state = connection_state
        # --grpc-header-forward-pattern: fields whose name matches it are kept as well
        # (``CallContext.invocation_metadata``), for the servicer to forward
        self.forward = forward
        # Header fields some method requires (MethodHandler.required): kept from each block
        self.wanted = frozenset(m.required[0] for m in self.methods.values() if m.required) | (
            STREAM_FIELDS if any(m.streaming for m in self.methods.values()) else frozenset()
        )
        self.max_receive = max_receive
        self.max_send = max_send
        self.max_concurrent_streams = max_concurrent_streams
        self.connections: set[H2Connection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.active_calls = 0
        # Whether calls started by ``MethodHandler.start`` get their receipt's trace
        # stamps (set while some trace level is on: DataPlane.on_tracing).
        self.stamping = False

    async def listen(self, host: str, port: int, reuse_port: bool) -> None:
        loop = asyncio.get_running_loop()
        hosts: str | None = None if host in ("", "0.0.0.0", "::", "[::]") else host.strip("[]")
        server = await loop.create_server(
            lambda: H2Connection(self),
            hosts,
            port,
            reuse_port=reuse_port or None,
        )
        self._servers.append(server)

    def call_started(self) -> None:
        self.active_calls += 1
        self._idle.clear()

    def call_finished(self) -> None:
        self.active_calls -= 1
        if self.active_calls <= 0:
            self._idle.set()

    async def stop(self, grace: float | None) -> None:
        """Stop taking connections and calls; let calls in flight finish for ``grace``
        seconds, then close every connection."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.goaway()
        if grace and self.active_calls:
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except asyncio.TimeoutError:
                pass
        for conn in list(self.connections):
            conn.close()
