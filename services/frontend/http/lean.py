"""A lean HTTP/1.1 transport for the REST frontend: an ``asyncio.Protocol`` on the
frontend's loop, parsing with ``httptools`` (llhttp).

aiohttp builds several objects per request and costs a frontend CPU and memory
(docs/architecture.md#why-the-lean-http-transport). This server serves the same route table as ``app.build_app`` (``routes.match``; the same
``DataPlane`` calls, ``codec`` functions, statuses, bodies and headers) with one parser per connection and one
bytes join per response. It serves by default; ``DESPINA_HTTP_TRANSPORT=aiohttp``
picks aiohttp instead (``services/frontend/__main__.py``).

What it implements: keep-alive (HTTP/1.1's default, ``Connection: close``, HTTP/1.0),
pipelined requests answered in order, chunked request bodies, ``Expect: 100-continue``,
percent-decoded path segments, large binary request bodies read straight into a
shared-memory block (as ``app.infer`` does) while the frontend's budget for bodies still
arriving allows (past it, the body is held as it arrives and copied once complete, so a
client that announces a large body and sends little holds little), large responses written from their parts
and their blocks released once the transport has sent them, read flow control (a
connection stops reading while a request is handled and more piles up, or while the
client does not read its answers), Triton's 404 ``{"error": "Not Found"}`` for unknown
paths and 405 ``{"error": "Method Not Allowed"}`` (with ``Allow``) for a known path and
another method; malformed HTTP gets a JSON 400 and the connection is closed. Every
response names Despina in a ``Server`` header (``identity.SERVER_HEADER``), which costs
nothing per request: it is part of the cached status line. A client that goes away
cancels its request.

Limits (``limits.HttpLimits``, issue #12): a body over the maximum input size gets 413
as soon as its headers say so (instead of ``100 Continue``), a long URL 414, too many or
too large header fields 431, checked as the bytes arrive (httptools grows a header
value piecewise: the bytes of an unfinished header are counted per read and cut at the
limit); a connection cap answers 503 to the connections past it and logs them (at most a
line a second). Timeouts cost nothing per request: one sweep per server a period
(``HttpLimits.sweep_period``) compares each connection's state with the last sweep's,
and closes those idle too long, or answers 408 to a request whose headers, or whose
body, stopped arriving.

The routes come from the one route table (``routes.match``) and are answered by
``lean_ops``: sync routes (liveness, server metadata, errors) in the parser's callbacks,
and so is infer: it is started from there and answered from its call's done callback (no
task, no coroutine: docs/architecture.md, "Less Python per request"). The other routes
that await the data plane run as one task per request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, cast

import httptools

from despina.common.errors import ServerError
from despina.services.frontend.dataplane import DataPlane
from despina.services.frontend.http import codec, lean_ops
from despina.services.frontend.http.errors import HTTP_STATUS
from despina.services.frontend.http.lean_ops import JSON
from despina.services.frontend.http.limits import HttpLimits, too_large_message
from despina.services.frontend.inference import (
    RequestMemo,
)
from despina.services.frontend.restricted import Restrictions, http_group, http_message
from despina.services.identity import SERVER_HEADER

log = logging.getLogger("despina.frontend")

# (method, path) -> what lean_ops.route made of it: most requests repeat a few paths.
_ROUTES: dict[tuple[bytes, bytes], tuple] = {}

CLOSE = b"Connection: close\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Read flow control: while a request is handled, a connection stops reading once this
# many complete requests wait behind it, or once the next one's body holds this much.
MAX_PIPELINED = 16
MAX_BUFFERED = 1 << 20
# Write flow control: the transport calls pause_writing above HIGH_WATER and
# resume_writing only once its buffer is empty (low water 0), so a large response's
# shared-memory parts are known to be sent when it resumes.
HIGH_WATER = 1 << 16
# After refusing a body it has not read, a connection reads and discards for this long
# (its write side shut) before closing, so that the client reads the refusal instead of
# a reset (the "lingering close" of Apache and nginx).
LINGER = 2.0

_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _STATUS_LINES[status] = (
            f"HTTP/1.1 {status} {phrase}\r\nServer: {SERVER_HEADER}\r\n".encode()
        )
    return line


class _Request:
    """One request as the parser reads it; its body is ``parts`` (joined when complete)
    or, for a large binary infer body, ``block`` (shared memory, owned by this request
    until its handler hands it to the data plane, ``drop``-ped in every case)."""

    __slots__ = (
        "url",
        "method",
        "length",
        "header_length",
        "expect",
        "route",
        "args",
        "parts",
        "size",
        "block",
        "filled",
        "keep_alive",
        "http10",
        "error",
        "body",
        "head",
        "raw",
        "reserved",
        "forwarded",  # set only with a header forward pattern (read via conn.forward)
        "received",  # set only while tracing (DataPlane.tracing)
    )
    forwarded: dict[str, str]  # header name in lower case -> value
    # HTTP_RECV_START, then HTTP_RECV_END: the trace stamps of its receipt (InferCall.proto)
    received: list[tuple[str, int]]

    def __init__(self) -> None:
        self.url = b""
        self.method = b""
        self.length: int | None = None  # Content-Length
        self.header_length: str | None = None  # Inference-Header-Content-Length
        self.expect = False
        self.route: Callable | None = None
        self.args: tuple = ()
        self.parts: list[bytes] = []
        self.size = 0
        self.block: Any = None
        self.filled = 0
        self.keep_alive = True
        self.http10 = False
        # A response decided before the handler runs: (status, body, content type, headers)
        self.error: tuple[int, bytes, bytes, bytes] | None = None
        self.body = b""
        self.head = 0  # header fields: their count << _FIELD_SHIFT | bytes of names, values
        self.raw = 0  # bytes of reads that ended with the headers still incomplete
        self.reserved = 0  # shared memory counted in the server's pending-body budget


def _error_reply(exc: ServerError) -> tuple[int, bytes, bytes, bytes]:
    return HTTP_STATUS.get(exc.code, 400), codec.encode_error(exc.message), JSON, b""


def _json_error(status: int, message: str) -> tuple[int, bytes, bytes, bytes]:
    return status, codec.encode_error(message), JSON, b""


class _Refusal(Exception):
    """Raised in a parser callback to stop parsing and answer ``reply``, then close
    (``linger``: after reading what the client still sends for a while)."""

    def __init__(self, reply: tuple[int, bytes, bytes, bytes], linger: bool = False) -> None:
        self.reply = reply
        self.linger = linger


# Triton's answers (src/http_server.cc) to a path no route serves and to another method.
TOO_LARGE = 413
# _Request.head counts a request's header fields and their bytes in one small int (one
# add per field): the count from bit 24, the bytes below (at most the header limit plus
# one read, so the header limit is capped at MAX_HEADER_SIZE).
_FIELD_SHIFT = 24
_BYTES = (1 << _FIELD_SHIFT) - 1
MAX_HEADER_SIZE = 8 * 1024 * 1024
UNAVAILABLE_REPLY = (
    _status_line(503)
    + JSON
    + CLOSE
    + b"Content-Length: %d\r\n\r\n" % len(codec.encode_error("too many connections"))
    + codec.encode_error("too many connections")
)


class LeanHttpServer:
    """Listens on (host, port) and serves the REST routes of ``app.build_app`` with
    ``plane`` within ``limits``. Connections, tasks, blocks and the sweep timer live on
    the caller's loop; not thread-safe."""

    def __init__(
        self,
        plane: DataPlane,
        limits: HttpLimits | None = None,
        restrictions: Restrictions | None = None,
        forward: re.Pattern[str] | None = None,
        *,
        memo: bool = True,
    ) -> None:
        """``memo``: each connection keeps a ``RequestMemo`` (a speed path's switch)."""
        self.plane = plane
        self.memo = memo
        self.limits = limits = limits or HttpLimits()
        # Restricted APIs (frontend/restricted.py): the header names connections keep
        # (lower case), None when nothing is restricted and no header is forwarded (no
        # cost per request then)
        self.restrictions = restrictions or {}
        self.wanted: frozenset[bytes] | None = (
            frozenset(h.lower().encode("latin-1") for h, _ in self.restrictions.values())
            if self.restrictions or forward is not None
            else None
        )
        # --http-header-forward-pattern, compiled once (inference.compile_forward_pattern)
        self.forward = forward
        self._restriction_of: dict[bytes, tuple[bytes, bytes, tuple] | None] = {}
        self.max_connections = limits.connection_cap()
        self.max_header_size = min(limits.max_header_size, MAX_HEADER_SIZE)
        self.connections: set[_Connection] = set()
        self.closing = False
        self.pending_body_bytes = 0  # shared memory reserved for bodies still arriving
        self.refused = 0  # connections refused since the last log line
        self._refused_logged_at = -1e9
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.TimerHandle | None = None

    async def listen(self, host: str, port: int, reuse_port: bool) -> None:
        """Bind and listen; raises OSError (port taken, bad address)."""
        loop = asyncio.get_running_loop()
        hosts: str | None = None if host in ("", "0.0.0.0", "::", "[::]") else host.strip("[]")
        server = await loop.create_server(
            lambda: _Connection(self), hosts, port, reuse_port=reuse_port or None
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.limits.sweep_period, self._sweep)

    def restriction_of(self, path: bytes) -> tuple[bytes, bytes, tuple] | None:
        """(header name in lower case, required value, the 403 reply) for a request path
        of a restricted group; None for others. Remembered per path (at most 256)."""
        try:
            return self._restriction_of[path]
        except KeyError:
            pass
        restriction = self.restrictions.get(http_group(path.decode("utf-8", "replace")) or "")
        found = None
        if restriction is not None:
            header, value = restriction
            reply = _json_error(403, http_message(header))
            found = header.lower().encode("latin-1"), value.encode(), reply
        if len(self._restriction_of) >= 256:
            self._restriction_of.clear()
        self._restriction_of[path] = found
        return found

    def _sweep(self) -> None:
        """Enforce the timeouts on every connection, log refused connections; rearm."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self.connections):
            conn.sweep(now)
        if self.refused:
            self._log_refused(now)
        self._sweeper = loop.call_later(self.limits.sweep_period, self._sweep)

    def refuse_connection(self, transport: asyncio.Transport) -> None:
        """Answer a connection past the cap with 503 and close it; log at most a line a
        second (with the count since the last one)."""
        transport.write(UNAVAILABLE_REPLY)
        transport.close()
        self.refused += 1
        self._log_refused(asyncio.get_running_loop().time())

    def _log_refused(self, now: float) -> None:
        if now - self._refused_logged_at < 1.0:
            return
        log.warning(
            "refused %d HTTP connection(s): %d open, the limit (--http-max-connections) is %d",
            self.refused,
            len(self.connections),
            self.max_connections,
        )
        self.refused = 0
        self._refused_logged_at = now

    def stop_listening(self) -> None:
        """Take no more connections; open ones are still served."""
        for server in self._servers:
            server.close()

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def stop(self, grace: float) -> None:
        """Stop listening, close idle connections, let busy ones finish their requests for
        ``grace`` seconds (each closes once answered), then close every connection."""
        self.stop_listening()
        self.closing = True
        for conn in list(self.connections):
            if conn.idle():
                conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.stop_sweeping()
        for conn in list(self.connections):
            conn.close()


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, answers them in order."""

    def __init__(self, server: LeanHttpServer) -> None:
        self.server = server
        self.plane = server.plane
        self.limits = server.limits
        self.max_header_size = server.max_header_size
        self.wanted = server.wanted  # restricted APIs' header names, or None
        self.seen: dict[bytes, bytes] = {}  # their first values in the current request
        self.forward = server.forward  # header names matching it reach the model
        self.forwarded: dict[str, str] = {}  # those of the current request
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.current: _Request | None = None  # being read
        self.queue: deque[_Request] = deque()  # read, not yet answered
        # What the request being answered waits on (a task, or an inference's future)
        self.task: asyncio.Future | None = None
        self.broken = False  # malformed input: answer what came before, then 400 and close
        self.read_paused = False
        self.write_paused = False
        self.drained: asyncio.Future | None = None
        # The last binary infer header, decoded; None: memos are off
        self.memo: RequestMemo | None = RequestMemo() if server.memo else None
        self.requests = 0  # requests begun on this connection
        self.linger = False  # refused a body it did not read: discard, then close
        self.lingering = False  # its answer sent and its write side shut
        # What the last sweep saw (see sweep) and when it first saw it
        self.mark: object = None
        self.mark_at = 0.0

    # --- connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no asyncio.Transport subclass: no isinstance check.
        transport = cast(asyncio.Transport, transport)
        server = self.server
        if len(server.connections) >= server.max_connections:
            self.broken = True
            server.refuse_connection(transport)
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER, low=0)
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        if self.task is not None:
            self.task.cancel()  # its handler drops its block and releases its result
        plane = self.plane
        if self.current is not None:
            self._abandon(self.current)
            self.current = None
        for req in self.queue:
            plane.release_body(req.block)
        self.queue.clear()
        self._wake_drained()

    def idle(self) -> bool:
        return self.task is None and not self.queue and self.current is None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def sweep(self, now: float) -> None:
        """Called by the server's sweep: note what this connection is doing; if it has
        done the same since an earlier sweep for longer than its timeout, act. Reading
        headers (header timeout: 408, close), reading a body that stopped arriving (idle
        timeout: 408, close), idle between requests (idle timeout, or the header timeout
        before a first request: close), lingering after a refusal (LINGER: close)."""
        req = self.current
        limits = self.limits
        token: object
        if self.broken:
            if not self.lingering:
                return
            token, timeout = "linger", LINGER
        elif req is not None:
            if req.method == b"":
                token, timeout = req, limits.header_timeout
            else:
                token, timeout = (req, req.size + req.filled), limits.idle_timeout
        elif self.task is None and not self.queue:
            token = self.requests
            timeout = limits.idle_timeout if self.requests else limits.header_timeout
        else:
            self.mark = None  # answering
            return
        if token != self.mark:
            self.mark = token
            self.mark_at = now
            return
        if now - self.mark_at < timeout:
            return
        if req is None or self.broken:
            self.close()
            return
        if req.method == b"":
            message = f"request headers not received within {timeout:g} s"
        else:
            message = f"request body stalled for {timeout:g} s"
        self._refuse(_json_error(408, message), linger=False)
        if self.task is None:
            self._next()

    def _abandon(self, req: _Request) -> None:
        """Free what a request that will not be handled holds: its block, its budget."""
        self.plane.release_body(req.block)
        req.block = None
        if req.reserved:
            self.server.pending_body_bytes -= req.reserved
            req.reserved = 0

    def pause_writing(self) -> None:
        self.write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drained()
        if self.task is None:
            self._next()
        self._flow()

    def _wake_drained(self) -> None:
        drained = self.drained
        if drained is not None:
            self.drained = None
            if not drained.done():
                drained.set_result(None)

    def _flow(self) -> None:
        """Pause or resume reading (see MAX_PIPELINED)."""
        transport = self.transport
        if transport is None or self.broken:
            return
        pause = self.write_paused or (
            self.task is not None
            and (
                len(self.queue) >= MAX_PIPELINED
                or (self.current is not None and self.current.size > MAX_BUFFERED)
            )
        )
        if pause != self.read_paused:
            self.read_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    # --- reading ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        before = self.current
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade()
        except httptools.HttpParserError as exc:
            refusal = exc.__context__
            if type(refusal) is _Refusal:
                self._refuse(refusal.reply, refusal.linger)
            else:
                self._malformed(str(exc).encode())
        else:
            req = self.current
            if req is not None and req.method == b"" and req is before:
                # A whole read of unfinished headers (httptools holds them, growing a
                # value piecewise): count it, so that no header grows past the limit
                # by more than one read.
                req.raw += len(data)
                if req.raw > self.max_header_size:
                    self._refuse(self._header_too_large(), linger=True)
        if self.task is None:
            self._next()
        else:
            self._flow()

    def _header_too_large(self) -> tuple[int, bytes, bytes, bytes]:
        limits = self.limits
        return _json_error(
            431,
            f"request header fields too large: at most {limits.max_header_count} fields "
            f"of {limits.max_header_size} bytes in all (--http-max-header-count, "
            "--http-max-header-size)",
        )

    def _refuse(self, reply: tuple[int, bytes, bytes, bytes], linger: bool = False) -> None:
        """Stop reading requests: answer ``reply`` after what came before, then close
        (``linger``: read and discard what the client still sends for LINGER seconds
        first, so that it reads the answer instead of a reset)."""
        self.broken = True
        req = self.current
        if req is None:
            req = _Request()
        else:
            self._abandon(req)
            self.current = None
        req.keep_alive = False
        req.parts = []
        req.error = reply
        self.queue.append(req)
        self.linger = linger
        if self.transport is not None:
            if linger:
                if self.read_paused:
                    self.read_paused = False
                    self.transport.resume_reading()
            elif not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()

    def _malformed(self, reason: bytes) -> None:
        self.broken = True
        if self.current is not None:
            self._abandon(self.current)
        req = self.current or _Request()
        self.current = None
        req.block = None
        req.keep_alive = False
        req.method = b""
        req.error = _json_error(400, "Bad Request: " + reason.decode("utf-8", "replace"))
        self.queue.append(req)
        if self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _upgrade(self) -> None:
        """No upgrades (nor CONNECT) here: answer the request as plain HTTP/1.1, then
        close. llhttp skips the body of an upgrade request: one that had a body gets 400."""
        queue = self.queue
        last = queue[-1] if queue else None
        if last is None or self.current is not None:
            self._malformed(b"incomplete upgrade request")
            return
        self.broken = True
        last.keep_alive = False
        if last.length and last.error is None:
            self._abandon(last)
            last.block = None
            last.error = _json_error(400, "Bad Request: upgrades are not supported")
        if self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def on_message_begin(self) -> None:
        self.current = _Request()
        self.requests += 1
        if self.plane.tracing:  # its first byte is here: for a trace, should it be sampled
            self.current.received = [("HTTP_RECV_START", time.time_ns())]
        if self.wanted is not None:
            self.seen = {}
            if self.forward is not None:
                self.forwarded = self.current.forwarded = {}

    def on_url(self, url: bytes) -> None:
        req = self.current
        if req is not None:
            req.url += url
            if len(req.url) > self.limits.max_url_size:
                raise _Refusal(
                    _json_error(
                        414,
                        f"request URL longer than {self.limits.max_url_size} bytes "
                        "(--http-max-url-size)",
                    ),
                    linger=True,
                )

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.current
        if req is None:
            return
        n = len(name)
        req.head += 0x1000000 + n + len(value)  # 1 << _FIELD_SHIFT: one more field
        if self.wanted is not None:
            lowered = name.lower()
            if lowered in self.wanted and lowered not in self.seen:
                self.seen[lowered] = value
            if self.forward is not None:
                key = lowered.decode("latin-1")
                if self.forward.search(key) is not None:
                    self.forwarded[key] = value.decode("utf-8", "replace")
        if n == 14:
            if name.lower() == b"content-length":
                req.length = int(value)  # llhttp has checked it is a number
        elif n == 31:
            if name.lower() == b"inference-header-content-length":
                req.header_length = value.decode("latin-1")
        elif n == 6 and name.lower() == b"expect":
            req.expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        req = self.current
        if req is None:
            return
        parser = self.parser
        req.method = method = parser.get_method()
        limits = self.limits
        head = req.head
        if head >> _FIELD_SHIFT > limits.max_header_count or head & _BYTES > self.max_header_size:
            raise _Refusal(self._header_too_large(), linger=True)
        length = req.length
        if length is not None and length > limits.max_input_size:
            # Before its body (and instead of 100 Continue)
            raise _Refusal(
                _json_error(TOO_LARGE, too_large_message(length, limits.max_input_size)),
                linger=True,
            )
        req.http10 = parser.get_http_version() == "1.0"
        url = req.url
        q = url.find(b"?")
        path = url if q < 0 else url[:q]
        route = _ROUTES.get((method, path))
        if route is None:
            route = lean_ops.route(method, path)
            if len(_ROUTES) >= 256:  # many distinct paths: start over
                _ROUTES.clear()
            _ROUTES[(method, path)] = route
        if type(route) is tuple and len(route) == 4:
            req.error = route
            return
        req.route, req.args = route  # type: ignore[misc]
        if self.wanted is not None:
            restriction = self.server.restriction_of(path)
            if restriction is not None and self.seen.get(restriction[0]) != restriction[1]:
                req.error = restriction[2]  # Triton's 403, before the body is read
                return
        if req.route is lean_ops.infer and req.header_length is not None:
            try:
                header_length = codec.parse_header_length(req.header_length)
                server = self.server
                if (
                    header_length is not None
                    and length is not None
                    and server.pending_body_bytes + length <= limits.max_pending_body_bytes
                ):
                    # Large binary tensors: the body goes straight into shared memory,
                    # where the backend host reads the inputs in place. Past the budget
                    # for bodies still arriving, it is held as it arrives instead.
                    req.block = block = self.plane.body_block(length)
                    if block is not None:
                        req.reserved = length
                        server.pending_body_bytes += length
            except ServerError as exc:
                req.error = _error_reply(exc)
                return
        if req.expect and not req.http10 and self.transport is not None:
            self.transport.write(CONTINUE)

    def on_body(self, body: bytes) -> None:
        req = self.current
        if req is None or req.error is not None:
            return
        n = len(body)
        block = req.block
        if block is not None:
            end = req.filled + n
            block.view[req.filled : end] = body  # llhttp stops at Content-Length
            req.filled = end
            return
        req.parts.append(body)
        req.size += n
        if req.size > self.limits.max_input_size:  # a chunked body
            raise _Refusal(
                _json_error(TOO_LARGE, too_large_message(req.size, self.limits.max_input_size)),
                linger=True,
            )

    def on_message_complete(self) -> None:
        req = self.current
        if req is None:
            return
        self.current = None
        if req.reserved:
            self.server.pending_body_bytes -= req.reserved
            req.reserved = 0
        req.keep_alive = req.keep_alive and self.parser.should_keep_alive()
        if self.plane.tracing:
            received = getattr(req, "received", None)
            if received is not None:
                received.append(("HTTP_RECV_END", time.time_ns()))
        if req.error is not None:
            req.parts = []
        elif req.block is None:
            parts = req.parts
            req.body = parts[0] if len(parts) == 1 else b"".join(parts)
            req.parts = []
        self.queue.append(req)

    # --- answering --------------------------------------------------------------------------

    def _next(self) -> None:
        """Answer queued requests in order: sync ones now, up to the first that waits
        (in a task or on a future, whose end calls back here)."""
        queue = self.queue
        while queue and self.task is None and not self.write_paused:
            if self.transport is None:
                return
            req = queue.popleft()
            if req.error is not None:
                self._reply(req, *req.error)
                continue
            route = req.route
            assert route is not None
            if route in lean_ops.SYNC:
                route(self, req, *req.args)
                continue
            self.task = self.loop.create_task(self._run(req, route(self, req, *req.args)))
        self._flow()

    async def _run(self, req: _Request, handler: Awaitable[None]) -> None:
        try:
            await handler
        except asyncio.CancelledError:
            return  # the connection is gone
        except Exception as exc:
            self._answer_error(req, exc)
        self.task = None
        if self.transport is not None:
            self._next()

    def _answer_error(self, req: _Request, exc: BaseException) -> None:
        """The one place a handler's error becomes a response: a ServerError its status
        (errors.HTTP_STATUS) and Triton's JSON body; anything else is a bug, logged,
        answered 500."""
        if isinstance(exc, ServerError):
            self._reply(req, *_error_reply(exc))
            return
        log.error(
            "HTTP %s %s failed",
            req.method.decode(),
            req.url.decode("latin-1"),
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        if self.transport is not None:
            self._reply(req, 500, codec.encode_error(f"internal error: {exc}"), JSON, b"")

    def _reply(
        self, req: _Request, status: int, body: bytes, content_type: bytes, headers: bytes
    ) -> None:
        """Write one response (the body omitted for HEAD); close after it when the
        request or the server says so."""
        transport = self.transport
        if transport is None:
            return
        close = not req.keep_alive or self.server.closing
        transport.write(
            b"".join(
                (
                    _status_line(status),
                    content_type,
                    b"Content-Length: %d\r\n" % len(body),
                    headers,
                    CLOSE if close else KEEP_ALIVE if req.http10 else b"",
                    b"\r\n",
                    b"" if req.method == b"HEAD" else body,
                )
            )
        )
        if close:
            self._close_after(transport)

    def _close_after(self, transport: asyncio.Transport) -> None:
        for queued in self.queue:
            self.plane.release_body(queued.block)
        self.queue.clear()
        self.broken = True  # read nothing more
        if self.linger and transport.can_write_eof():
            transport.write_eof()  # the sweep closes it after LINGER
            self.lingering = True
        else:
            self.linger = False
            transport.close()

    def _begin_chunked(self, req: _Request, content_type: bytes) -> None:
        """The head of a response whose body follows in pieces (``_write_chunk``, then
        ``_end_chunked``): chunked for HTTP/1.1, up to the connection's close for 1.0."""
        transport = self.transport
        if transport is None:
            return
        close = not req.keep_alive or self.server.closing or req.http10
        transport.write(
            b"".join(
                (
                    _status_line(200),
                    content_type,
                    b"" if req.http10 else b"Transfer-Encoding: chunked\r\n",
                    CLOSE if close else b"",
                    b"\r\n",
                )
            )
        )

    async def _write_chunk(self, req: _Request, data: bytes) -> None:
        """One piece of a ``_begin_chunked`` body; returns once the transport takes more
        (a client that does not read holds the writer back, not our memory)."""
        transport = self.transport
        if transport is None or not data:
            return
        transport.write(data if req.http10 else b"%x\r\n%s\r\n" % (len(data), data))
        if self.write_paused and self.transport is not None:
            self.drained = self.loop.create_future()
            await self.drained

    def _end_chunked(self, req: _Request) -> None:
        transport = self.transport
        if transport is None:
            return
        if not req.http10:
            transport.write(b"0\r\n\r\n")
        if not req.keep_alive or self.server.closing or req.http10:
            self._close_after(transport)

    async def _send_parts(
        self, req: _Request, parts: list, size: int, content_type: bytes, headers: bytes
    ) -> None:
        """Write a large response from its parts (views of shared memory included) and
        return once the transport has sent them all."""
        transport = self.transport
        if transport is None:
            return
        close = not req.keep_alive or self.server.closing
        head = b"".join(
            (
                _status_line(200),
                content_type,
                b"Content-Length: %d\r\n" % size,
                headers,
                CLOSE if close else KEEP_ALIVE if req.http10 else b"",
                b"\r\n",
            )
        )
        transport.writelines([head, *parts])
        while self.transport is not None and transport.get_write_buffer_size():
            if self.write_paused:
                # resume_writing comes once the buffer is empty (low water 0).
                self.drained = self.loop.create_future()
                await self.drained
            else:
                await asyncio.sleep(0.001)
        if close and self.transport is not None:
            self._close_after(transport)


# --- routes ---------------------------------------------------------------------------------
