"""A lean HTTP/2 transport for gRPC on the frontend's event loop: the plaintext server.

grpc.aio runs each call through three threads (gRPC core's event-engine threads read and
write the socket, a poller thread drains the completion queue, the event loop runs the
handler) and a dozen Python objects and tasks: measured on a 2-vCPU box, ~450-500 us of
CPU per unary call with a canned answer, where an ``asyncio.Protocol`` that speaks the
same HTTP/2 on the loop itself takes ~100 us. The frontend spends that CPU on every
request, so this transport serves gRPC when nothing needs gRPC core: no TLS, no response
compression, and keepalive settings at Triton's defaults (``server.start_server`` picks
grpc.aio otherwise; ``DESPINA_GRPC_TRANSPORT=grpcio`` forces it).

What it implements, for the servicer's methods (``server.method_handlers``):

- HTTP/2 (RFC 9113) as a server: the preface, SETTINGS, PING, WINDOW_UPDATE, RST_STREAM,
  GOAWAY, CONTINUATION, padding; flow control both ways (large windows advertised, the
  peer's windows and frame size respected when sending); HPACK (RFC 7541) header blocks
  decoded with ``hpack``, and a cache for blocks of indexed fields only (what a client
  sends once its table is warm: decoding them changes nothing).
- Hostile peers (RFC 9113 section 10.5, issue #12): at most ``max_concurrent_streams``
  streams open (advertised; more are refused with REFUSED_STREAM), header lists bounded
  (SETTINGS_MAX_HEADER_LIST_SIZE), the cache of header blocks bounded by bytes, frames that
  make work without a call (PING, SETTINGS, PRIORITY, empty DATA, resets of streams
  already closed, refused streams, unknown types) and resets of calls in flight limited per
  second (past it: GOAWAY ENHANCE_YOUR_CALM, as gRPC core answers floods), no reading while
  the transport's write buffer is above its high-water mark (a peer that does not read
  cannot grow our buffers), a call reset in the read that started it never runs, and a
  streaming call takes its next response only once the last one is sent and gives back no
  flow-control window while its handler has ``STREAM_BACKLOG`` requests untaken.
- RFC 9113's connection and stream errors: frame sizes, frames on the wrong stream,
  idle and closed streams, stream ids that go down, SETTINGS values, zero and overflowing
  window updates, self-dependency, malformed requests (uppercase or connection-specific
  field names, pseudo-headers missing, repeated, unknown or after regular fields); the
  client preface must be followed by SETTINGS. A request that is no gRPC (content-type
  not ``application/grpc...``) gets HTTP 415.
- gRPC over it: unary and bidirectional-streaming calls, length-prefixed messages,
  compressed requests (``grpc-encoding`` gzip or deflate), ``grpc-timeout`` deadlines,
  the receive size limit (RESOURCE_EXHAUSTED, compressed messages inflated no further
  than it), cancellation by RST_STREAM, a deadline or a closed connection (the future or
  task the call waits on is cancelled, which cancels the request downstream), statuses and messages in trailers (Trailers-Only for calls that fail before
  answering), UNIMPLEMENTED for unknown methods.

Handlers are called as grpc.aio calls them, ``handler(request, context)``, with a context
whose ``abort`` ends the call with a status; a unary method that can also be started
without a coroutine (``MethodHandler.start``: ModelInfer) is, in the frame parser.
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from functools import partial
from typing import Any, NamedTuple, NoReturn, cast
from urllib.parse import quote

from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError

log = logging.getLogger("despina.frontend")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# SETTINGS identifiers
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 5, 6

# Error codes (RFC 9113 section 7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

MAX_WINDOW = 2**31 - 1
# What this server lets a peer send on the connection before it says more; topped up once
# half is used.
RECV_WINDOW = 2**30
# Each stream's window (SETTINGS_INITIAL_WINDOW_SIZE), also topped up once half is used
# (a 16 MiB tensor arrives without waiting for an update): what a streaming call's
# requests may hold beyond STREAM_BACKLOG untaken messages.
STREAM_WINDOW = 16 << 20
MAX_FRAME = 2**24 - 1  # the largest frame the peer may send us

# What one peer may make this server hold or do (docs/security.md lists them).
# Streams open at once on a connection (SETTINGS_MAX_CONCURRENT_STREAMS, advertised; the
# flag --grpc-http2-max-concurrent-streams): a HEADERS past it gets REFUSED_STREAM.
MAX_CONCURRENT_STREAMS_DEFAULT = 1000
# SETTINGS_MAX_HEADER_LIST_SIZE, advertised (gRPC core's hard default): a request whose
# header list is larger ends with RESOURCE_EXHAUSTED; one past HARD_HEADER_LIST (or a
# header block, or any frame but DATA, that long) ends the connection with
# ENHANCE_YOUR_CALM, since HPACK's state must be kept or the connection dropped.
MAX_HEADER_LIST = 16 << 10
HARD_HEADER_LIST = 2 * MAX_HEADER_LIST
# The cache of decoded header blocks (see _Connection._head): its keys and values in bytes,
# and the largest block it keeps (a warm client's block is a few dozen bytes).
HEADER_CACHE_BYTES = 64 << 10
HEADER_CACHE_BLOCK = 1 << 10
# Frames that cost work and run no call (PING, SETTINGS, PRIORITY, empty DATA, CONTINUATION
# or unknown frames, resets or DATA of closed streams, refused streams), and resets of calls
# in flight (CVE-2023-44487), per connection: more within a second ends the connection with
# GOAWAY ENHANCE_YOUR_CALM. Counted, and checked against the clock only past the limit.
CONTROL_FRAMES_PER_SECOND = 1000
RESETS_PER_SECOND = 200
# Request messages a streaming call's handler has not taken yet: past it the stream's
# window is not topped up until the handler has taken half of them (flow control holds
# the client back; the connection reads on, so the client's WINDOW_UPDATEs still come).
STREAM_BACKLOG = 64
# Request header fields a streaming call's handler reads (``CallContext.invocation_metadata``):
# Triton's switch for ending a ModelStreamInfer stream with a request's error status.
STREAM_FIELDS = frozenset((b"triton_grpc_error",))
# Streams reset by this server whose late frames are still ignored, not refused.
_RESET_MEMORY = 64

# grpc-status codes
OK, CANCELLED_CODE, UNKNOWN_CODE, DEADLINE_CODE = 0, 1, 2, 4
RESOURCE_EXHAUSTED_CODE, UNIMPLEMENTED_CODE, INTERNAL_CODE = 8, 12, 13

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_ACCEPT_ENCODING = b"identity,deflate,gzip"


def _frame(kind: int, flags: int, stream: int, payload: bytes | memoryview = b"") -> bytes:
    n = len(payload)
    return (
        bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, kind, flags))
        + stream.to_bytes(4, "big")
        + bytes(payload)
    )


def _frame_header(kind: int, flags: int, stream: int, n: int) -> bytes:
    return bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, kind, flags)) + stream.to_bytes(4, "big")


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman coding."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


# :status 200 (static index 8), then content-type and grpc-accept-encoding as literals.
RESPONSE_HEADERS = (
    b"\x88"
    + _literal(b"content-type", b"application/grpc")
    + _literal(b"grpc-accept-encoding", _ACCEPT_ENCODING)
)
OK_TRAILERS = _literal(b"grpc-status", b"0")
# A request that is no gRPC: HTTP 415 (gRPC over HTTP/2, "Requests"); ":status" is static
# index 8, its value a literal.
UNSUPPORTED_MEDIA = b"\x08\x03415" + _literal(b"content-type", b"text/plain")


def _status_block(code: int, message: str, with_headers: bool) -> bytes:
    block = RESPONSE_HEADERS if with_headers else b""
    block += _literal(b"grpc-status", str(code).encode())
    if message:
        # grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2, "Responses").
        block += _literal(
            b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()
        )
    return block


class _Abort(Exception):
    """Raised by ``CallContext.abort``: the call ends with the status set on it."""


class CallContext:
    """The part of grpc.aio's ServicerContext the servicer uses. ``fields``: the first
    value of each request header field the server wants (``H2Server.wanted``)."""

    __slots__ = ("code", "details", "fields")

    def __init__(self, fields: dict[bytes, bytes] | None = None) -> None:
        self.code = OK
        self.details = ""
        self.fields = fields

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The wanted request header fields, as grpc.aio's (key, value) pairs."""
        fields = self.fields
        if not fields:
            return ()
        return tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in fields.items())

    async def abort(self, code: int, details: str = "") -> NoReturn:
        self.code = int(code)
        self.details = details
        raise _Abort()


class MethodHandler(NamedTuple):
    """One method: ``behaviour(request, context)`` returns the response (unary) or, when
    ``streaming`` (bidirectional), takes an async iterator of requests and yields
    responses. A (de)serializer of None passes message bytes through.

    ``start`` (optional, unary methods without (de)serializers): the call without a task
    or coroutine (~15 µs of a c=1 call): ``start(request, answer)`` returns the future
    the call waits on, cancelled if the call ends first, or None once it has answered;
    it answers with ``answer(response, OK, "")`` or ``answer(None, status, message)``.

    ``required`` (optional): (header name in lower case, value, status, message): a call
    without that header field of exactly that value (its first, if repeated) ends with
    that status before it starts (restricted protocols, ``frontend/restricted.py``)."""

    behaviour: Callable
    request_deserializer: Callable | None
    response_serializer: Callable | None
    streaming: bool
    start: Callable | None = None
    required: tuple[bytes, bytes, int, str] | None = None


class _Method:
    __slots__ = ("streaming", "behaviour", "deserializer", "serializer", "start", "required")

    def __init__(self, handler: MethodHandler) -> None:
        self.streaming = handler.streaming
        self.required = handler.required
        self.behaviour = handler.behaviour
        self.deserializer = handler.request_deserializer
        self.serializer = handler.response_serializer
        raw = self.deserializer is None and self.serializer is None
        self.start = handler.start if raw and not self.streaming else None


class _Requests:
    """A stream's request messages, as the async iterator a streaming handler reads.

    ``held`` once more than ``STREAM_BACKLOG`` messages wait untaken (the connection then
    keeps the stream's window); ``caught_up()`` is called once the handler has taken half
    of them."""

    __slots__ = ("_queue", "_deserializer", "_caught_up", "held")

    def __init__(self, deserializer: Callable | None, caught_up: Callable[[], None]) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._deserializer = deserializer
        self._caught_up = caught_up
        self.held = False

    def put(self, message: bytes | BaseException | None) -> None:
        queue = self._queue
        queue.put_nowait(message)
        if queue.qsize() > STREAM_BACKLOG:
            self.held = True

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        message = await self._queue.get()
        if self.held and self._queue.qsize() <= STREAM_BACKLOG // 2:
            self.held = False
            self._caught_up()
        if message is None:
            self._queue.put_nowait(None)  # stays at the end
            raise StopAsyncIteration
        if isinstance(message, BaseException):
            raise message
        return message if self._deserializer is None else self._deserializer(message)


class _Stream:
    __slots__ = (
        "sid",
        "method",
        "encoding",
        "deadline",
        "parts",
        "size",
        "need",
        "compressed",
        "messages",
        "requests",
        "task",
        "send_window",
        "pending",
        "trailers",
        "headers_sent",
        "remote_closed",
        "closed",
        "timer",
        "consumed",
        "waiter",
        "withheld",
        "fields",  # set only with a header forward pattern (H2Server.forward)
        "inflating",
    )
    fields: dict[bytes, bytes] | None

    def __init__(self, sid: int, send_window: int) -> None:
        self.sid = sid
        self.method: _Method | None = None
        self.encoding = ""
        self.deadline: float | None = None
        self.parts: list = []  # bytes of the message being read
        self.size = 0  # bytes in parts
        self.need = -1  # the message's length once its prefix is read
        self.compressed = False
        self.messages: list[bytes] = []  # unary: the request
        self.requests: _Requests | None = None  # streaming
        # What the call waits on: its task, or the future ``MethodHandler.start`` gave.
        self.task: asyncio.Future | None = None
        self.send_window = send_window
        self.pending: deque = deque()  # response bytes waiting for window
        self.trailers: bytes | None = None  # sent once pending is empty
        self.headers_sent = False
        self.remote_closed = False
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.consumed = 0  # received bytes not yet given back in a WINDOW_UPDATE
        self.waiter: asyncio.Future | None = None  # a streaming call waiting for its sends
        self.withheld = 0  # received bytes kept from the stream's window (STREAM_BACKLOG)
        self.inflating: deque[_Inflation] | None = None  # messages being inflated, in order


class _Head(NamedTuple):
    """What a header block says, checked once per distinct block (and cached with it)."""

    path: str
    content_type: bytes
    encoding: str
    timeout: float | None
    bad_timeout: bool  # a grpc-timeout that is no 1-8 digits and a unit
    request_error: bool  # no well-formed request (RFC 9113 8.1.1: a stream PROTOCOL_ERROR)
    trailer_error: bool  # no well-formed trailers (pseudo-headers, or malformed fields)
    size: int  # the header list's size as RFC 9113 counts it (32 bytes a field more)
    fields: dict[bytes, bytes] | None = None  # the first value of each wanted field


_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))


def _parse_head(
    headers: Iterable,
    wanted: frozenset[bytes] = frozenset(),
    forward: re.Pattern[str] | None = None,
) -> _Head:
    """The gRPC fields of a decoded header list (and the first value of each field named
    in ``wanted`` or whose name ``forward`` matches), and whether it is a well-formed
    request or trailers (RFC 9113 8.2 and 8.3)."""
    fields: dict[bytes, bytes] | None = {} if wanted or forward is not None else None
    path = content_type = b""
    encoding = ""
    timeout: float | None = None
    bad_timeout = malformed = regular = False
    seen: set[bytes] = set()
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 32
        if name[:1] == b":":
            if regular or name not in _REQUEST_PSEUDO or name in seen:
                malformed = True
            elif not value and name != b":authority":
                malformed = True
            seen.add(name)
            if name == b":path":
                path = value
            continue
        regular = True
        if name.lower() != name or name in _CONNECTION_SPECIFIC:
            malformed = True
        elif name == b"te":
            malformed = malformed or value != b"trailers"
        elif name == b"content-type":
            content_type = value
        elif name == b"grpc-encoding":
            encoding = value.decode("latin-1")
        elif name == b"grpc-timeout":
            timeout = _timeout(value)
            bad_timeout = timeout is None
        elif fields is not None and name not in fields:
            if name in wanted or (
                forward is not None and forward.search(name.decode("latin-1")) is not None
            ):
                fields[name] = value
    complete = b":method" in seen and b":scheme" in seen and b":path" in seen
    return _Head(
        path.decode("latin-1"),
        content_type,
        encoding,
        timeout,
        bad_timeout,
        malformed or not complete,
        malformed or bool(seen),
        size,
        fields,
    )


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
    ) -> None:
        self.methods = {path: _Method(h) for path, h in handlers.items()}
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
        self.connections: set[_Connection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.active_calls = 0

    async def listen(self, host: str, port: int, reuse_port: bool) -> None:
        loop = asyncio.get_running_loop()
        hosts: str | None = None if host in ("", "0.0.0.0", "::", "[::]") else host.strip("[]")
        server = await loop.create_server(
            lambda: _Connection(self),
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


class _Connection(asyncio.Protocol):
    """One client connection. Everything runs on the loop: no method is safe from
    another thread. Frame handlers raise ``_ConnectionError`` for a connection error
    (``data_received`` answers it with GOAWAY and closes) and answer stream errors
    themselves (RST_STREAM, or a gRPC status)."""

    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.preface = False
        self.decoder = Decoder()
        self.decoder.max_header_list_size = HARD_HEADER_LIST
        self.heads: dict[bytes, _Head] = {}  # see _head
        self.heads_bytes = 0
        self.streams: dict[int, _Stream] = {}
        self.last_sid = 0
        self.going_away = False
        self.send_window = 65535  # the connection's, for what we send
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self.consumed = 0  # connection-level bytes received, not yet given back
        self.header_block: bytearray | None = None  # a HEADERS frame awaiting CONTINUATION
        self.header_sid = 0
        self.header_end_stream = False
        self.header_self_dependent = False
        self.out: list = []  # frames (and message pieces) to write at the end of this read
        self.starting: list[_Stream] = []  # calls complete in this read, started after it
        self.reset_sids: dict[int, None] = {}  # streams we reset, newest last
        self.loop = asyncio.get_running_loop()
        # Flood counters (see CONTROL_FRAMES_PER_SECOND): a count, and when it restarted.
        self.strikes = 0
        self.strikes_since = self.loop.time()
        self.resets = 0
        self.resets_since = self.strikes_since
        self.write_paused = False

    # --- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no asyncio.Transport subclass: no isinstance check.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.server.connections.add(self)
        settings = b"".join(
            k.to_bytes(2, "big") + v.to_bytes(4, "big")
            for k, v in (
                (ENABLE_PUSH, 0),
                (MAX_CONCURRENT_STREAMS, self.server.max_concurrent_streams),
                (INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (MAX_FRAME_SIZE, MAX_FRAME),
                (MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
            )
        )
        transport.write(
            _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, (RECV_WINDOW - 65535).to_bytes(4, "big"))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        for stream in list(self.streams.values()):
            self._cancel(stream)
        self.streams.clear()
        self.starting = []

    def pause_writing(self) -> None:
        # The peer reads slower than we write: read nothing more (no more answers to
        # queue) until the transport's buffer has drained.
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None:
            self.transport.resume_reading()
        for stream in list(self.streams.values()):
            if stream.waiter is not None and not stream.pending:
                self._wake(stream)

    def goaway(self, code: int = NO_ERROR) -> None:
        if self.transport is None or self.going_away:
            return
        self.going_away = True
        self.transport.write(
            _frame(GOAWAY, 0, 0, self.last_sid.to_bytes(4, "big") + code.to_bytes(4, "big"))
        )
        if not self.streams:
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail(self, code: int) -> None:
        """A connection error: GOAWAY with ``code`` and close."""
        if self.transport is None:
            return
        self._flush()
        self.transport.write(
            _frame(GOAWAY, 0, 0, self.last_sid.to_bytes(4, "big") + code.to_bytes(4, "big"))
        )
        self.transport.close()
        self.buf = bytearray()
        self.starting = []

    def _flush(self) -> None:
        out = self.out
        if out and self.transport is not None:
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                # Large message pieces go out as they are (writev), not joined first.
                self.transport.writelines(out)
        self.out = []

    def _strike(self) -> None:
        """One more frame that makes work without a call; past CONTROL_FRAMES_PER_SECOND
        within a second, a connection error (ENHANCE_YOUR_CALM)."""
        self.strikes += 1
        if self.strikes > CONTROL_FRAMES_PER_SECOND:
            now = self.loop.time()
            if now - self.strikes_since < 1.0:
                raise _ConnectionError(ENHANCE_YOUR_CALM)
            self.strikes_since = now
            self.strikes = 1

    def _count_reset(self) -> None:
        """The peer reset a call in flight; past RESETS_PER_SECOND within a second, a
        connection error (ENHANCE_YOUR_CALM): the rapid-reset attack."""
        self.resets += 1
        if self.resets > RESETS_PER_SECOND:
            now = self.loop.time()
            if now - self.resets_since < 1.0:
                raise _ConnectionError(ENHANCE_YOUR_CALM)
            self.resets_since = now
            self.resets = 1

    # --- reading frames -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # Frames that lie whole in ``data`` (immutable) are read in place: a DATA payload
        # is a view of it, no copy. Only a frame cut by the end of a read is assembled in
        # ``buf`` (a bytearray, so payloads taken from it are copied).
        buf = self.buf
        if buf:
            buf += data
            source: bytes | bytearray = buf
        else:
            source = data
        pos = 0
        if not self.preface:
            # The client preface, then a SETTINGS frame (RFC 9113 3.4).
            if len(source) >= 24 and source[:24] != PREFACE:
                self._fail(PROTOCOL_ERROR)
                return
            if len(source) < 33:
                if source is data:
                    buf += data
                return
            if source[27] != SETTINGS or source[28] & ACK:
                self._fail(PROTOCOL_ERROR)
                return
            self.preface = True
            pos = 24
        end = len(source)
        view = memoryview(source)
        copy = source is buf
        failed = 0
        try:
            while end - pos >= 9:
                length = (source[pos] << 16) | (source[pos + 1] << 8) | source[pos + 2]
                kind = source[pos + 3]
                if end - pos - 9 < length:
                    # Only DATA may be long; a longer frame of another kind is not
                    # waited for (its bytes would be held first).
                    if kind != DATA and length > HARD_HEADER_LIST:
                        raise _ConnectionError(ENHANCE_YOUR_CALM)
                    break
                flags = source[pos + 4]
                sid = int.from_bytes(source[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                start = pos + 9
                pos = start + length
                if self.header_block is not None and kind != CONTINUATION:
                    raise _ConnectionError(PROTOCOL_ERROR)
                if kind == DATA:
                    self._on_data(sid, flags, bytes(view[start:pos]) if copy else view[start:pos])
                    continue
                payload = bytes(view[start:pos])
                if kind == HEADERS:
                    self._on_headers(sid, flags, payload)
                elif kind == CONTINUATION:
                    self._on_continuation(sid, flags, payload)
                elif kind == SETTINGS:
                    self._on_settings(sid, flags, payload)
                elif kind == WINDOW_UPDATE:
                    self._on_window_update(sid, payload)
                elif kind == PING:
                    if sid:
                        raise _ConnectionError(PROTOCOL_ERROR)
                    if length != 8:
                        raise _ConnectionError(FRAME_SIZE_ERROR)
                    self._strike()
                    if not flags & ACK:
                        self.out.append(_frame(PING, ACK, 0, payload))
                elif kind == RST_STREAM:
                    self._on_rst_stream(sid, payload)
                elif kind == PRIORITY:
                    self._on_priority(sid, payload)
                elif kind == GOAWAY:
                    if sid:
                        raise _ConnectionError(PROTOCOL_ERROR)
                    if length < 8:
                        raise _ConnectionError(FRAME_SIZE_ERROR)
                    self.going_away = True
                elif kind == PUSH_PROMISE:
                    raise _ConnectionError(PROTOCOL_ERROR)
                else:
                    self._strike()  # unknown frame types are ignored, and counted
                if self.transport is None:
                    break
        except _ConnectionError as exc:
            failed = exc.code
        finally:
            if copy:
                view.release()
        if failed:
            self._fail(failed)
            return
        if self.transport is None:
            return
        if copy:
            del buf[:pos]
        elif pos < end:
            buf += view[pos:]
        if self.starting:
            self._start_calls()
        self._flush()

    def _on_settings(self, sid: int, flags: int, payload: bytes) -> None:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR)
        if flags & ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR)
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR)
        self._strike()
        for i in range(0, len(payload), 6):
            key = int.from_bytes(payload[i : i + 2], "big")
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR)
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise _ConnectionError(FLOW_CONTROL_ERROR)
            elif key == MAX_FRAME_SIZE:
                if not 16384 <= value <= MAX_FRAME:
                    raise _ConnectionError(PROTOCOL_ERROR)
                self.peer_max_frame = value
            elif key == ENABLE_PUSH:
                if value > 1:
                    raise _ConnectionError(PROTOCOL_ERROR)
            # HEADER_TABLE_SIZE: our header blocks use no dynamic table.
        self.out.append(_frame(SETTINGS, ACK, 0))
        self._send_pending()

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR)
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if not increment:
                raise _ConnectionError(PROTOCOL_ERROR)
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR)
            self._send_pending()
            return
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last_sid:
                raise _ConnectionError(PROTOCOL_ERROR)  # an idle stream
            return  # a closed one: its update may have crossed our end of it
        if not increment:
            self._reset(sid, PROTOCOL_ERROR, stream)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._reset(sid, FLOW_CONTROL_ERROR, stream)
            return
        self._send_stream(stream)

    def _on_rst_stream(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR)
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR)
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last_sid:
                raise _ConnectionError(PROTOCOL_ERROR)  # an idle stream
            self._strike()
            return
        self._count_reset()
        del self.streams[sid]
        self._cancel(stream)
        self._forget(stream)

    def _on_priority(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR)
        self._strike()
        if len(payload) != 5:
            self._reset(sid, FRAME_SIZE_ERROR, self.streams.get(sid))
        elif int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == sid:
            self._reset(sid, PROTOCOL_ERROR, self.streams.get(sid))

    @staticmethod
    def _unpad(flags: int, payload: Any) -> Any:
        if flags & PADDED:
            if not payload:
                raise _ConnectionError(PROTOCOL_ERROR)
            pad = payload[0]
            if pad >= len(payload):
                raise _ConnectionError(PROTOCOL_ERROR)
            return payload[1 : len(payload) - pad]
        return payload

    def _on_headers(self, sid: int, flags: int, payload: bytes) -> None:
        if sid == 0 or sid % 2 == 0:
            raise _ConnectionError(PROTOCOL_ERROR)
        block = self._unpad(flags, payload)
        self_dependent = False
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise _ConnectionError(FRAME_SIZE_ERROR)
            self_dependent = int.from_bytes(block[:4], "big") & 0x7FFFFFFF == sid
            block = block[5:]
        end_stream = bool(flags & END_STREAM)
        if flags & END_HEADERS:
            self._on_header_block(sid, block, end_stream, self_dependent)
        else:
            self.header_block = bytearray(block)
            self.header_sid = sid
            self.header_end_stream = end_stream
            self.header_self_dependent = self_dependent

    def _on_continuation(self, sid: int, flags: int, payload: bytes) -> None:
        if self.header_block is None or sid != self.header_sid:
            raise _ConnectionError(PROTOCOL_ERROR)
        if not payload and not flags & END_HEADERS:
            self._strike()
        self.header_block += payload
        if len(self.header_block) > HARD_HEADER_LIST:
            raise _ConnectionError(ENHANCE_YOUR_CALM)
        if flags & END_HEADERS:
            block = bytes(self.header_block)
            self.header_block = None
            self._on_header_block(sid, block, self.header_end_stream, self.header_self_dependent)

    def _head(self, block: bytes) -> _Head:
        """The block decoded and checked. A block that leaves the decoder's dynamic table
        as it was (indexed fields and literals not indexed: what a client sends once its
        table is warm) decodes the same way until a block that changes the table comes:
        those are cached, up to HEADER_CACHE_BYTES."""
        head = self.heads.get(block)
        if head is not None:
            return head
        table = self.decoder.header_table
        entries = table.dynamic_entries
        count, first, size = len(entries), entries[0] if entries else None, table.maxsize
        try:
            headers = self.decoder.decode(block, raw=True)
        except OversizedHeaderListError:
            raise _ConnectionError(ENHANCE_YOUR_CALM) from None
        except HPACKError:
            raise _ConnectionError(COMPRESSION_ERROR) from None
        head = _parse_head(headers, self.server.wanted, self.server.forward)
        # An insertion puts a new entry first (compared by identity, not value).
        newest = entries[0] if entries else None
        if len(entries) == count and newest is first and table.maxsize == size:
            cost = len(block) + head.size
            if len(block) <= HEADER_CACHE_BLOCK and self.heads_bytes + cost <= HEADER_CACHE_BYTES:
                self.heads[block] = head
                self.heads_bytes += cost
        else:
            self.heads.clear()
            self.heads_bytes = 0
        return head

    def _on_header_block(
        self, sid: int, block: bytes, end_stream: bool, self_dependent: bool = False
    ) -> None:
        head = self._head(block)  # decoded whatever comes of it: HPACK's state
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from the client
            if stream.remote_closed:
                self._reset(sid, STREAM_CLOSED, stream)
            elif not end_stream or head.trailer_error or self_dependent:
                self._reset(sid, PROTOCOL_ERROR, stream)
            else:
                self._end_of_requests(stream)
            return
        if sid <= self.last_sid:
            if sid in self.reset_sids:
                return  # trailers of a call we reset before the client knew
            # A closed stream (the last one), or a new id below the last (RFC 9113 5.1.1).
            raise _ConnectionError(STREAM_CLOSED if sid == self.last_sid else PROTOCOL_ERROR)
        self.last_sid = sid
        if self.going_away:
            self._reset(sid, REFUSED_STREAM)
            return
        if head.request_error or self_dependent:
            self._reset(sid, PROTOCOL_ERROR)
            return
        if len(self.streams) >= self.server.max_concurrent_streams:
            self._strike()
            self._reset(sid, REFUSED_STREAM)
            return
        stream = _Stream(sid, self.peer_initial_window)
        self.streams[sid] = stream
        stream.remote_closed = end_stream
        if not head.content_type.startswith(b"application/grpc"):
            stream.headers_sent = True
            self._finish(stream, UNSUPPORTED_MEDIA)
            return
        if head.size > MAX_HEADER_LIST:
            self._status(
                stream,
                RESOURCE_EXHAUSTED_CODE,
                f"header list of {head.size} bytes is larger than max ({MAX_HEADER_LIST})",
            )
            return
        if head.bad_timeout:
            self._status(stream, INTERNAL_CODE, "invalid grpc-timeout")
            return
        method = self.server.methods.get(head.path)
        if method is None:
            self._status(stream, UNIMPLEMENTED_CODE, "Method not found!")
            return
        required = method.required
        if required is not None:
            fields = head.fields
            if fields is None or fields.get(required[0]) != required[1]:
                self._status(stream, required[2], required[3])
                return
        stream.encoding = head.encoding
        stream.deadline = head.timeout
        stream.method = method
        if self.server.forward is not None:
            stream.fields = head.fields  # a unary call's metadata, read when it starts
        self.server.call_started()
        if stream.deadline is not None:
            stream.timer = self.loop.call_later(stream.deadline, self._expire, stream)
        if method.streaming:
            stream.requests = _Requests(method.deserializer, partial(self._caught_up, stream))
            stream.task = self.loop.create_task(self._run(stream, method, head.fields))
        if end_stream:
            self._end_of_requests(stream)

    def _on_data(self, sid: int, flags: int, payload: bytes | memoryview) -> None:
        size = len(payload)
        self.consumed += size
        if self.consumed >= RECV_WINDOW // 2:
            self.out.append(_frame(WINDOW_UPDATE, 0, 0, self.consumed.to_bytes(4, "big")))
            self.consumed = 0
        stream = self.streams.get(sid)
        if stream is None or stream.remote_closed:
            self._stray_data(sid, stream)
            return
        if not size and not flags & END_STREAM:
            self._strike()
        requests = stream.requests
        if requests is not None and requests.held:
            stream.withheld += size
        else:
            stream.consumed += size
            if stream.consumed >= STREAM_WINDOW // 2:
                self.out.append(_frame(WINDOW_UPDATE, 0, sid, stream.consumed.to_bytes(4, "big")))
                stream.consumed = 0
        data = self._unpad(flags, payload)
        if stream.method is not None and not stream.closed:
            self._read_messages(stream, data)
        if flags & END_STREAM:
            self._end_of_requests(stream)

    def _caught_up(self, stream: _Stream) -> None:
        """A streaming call's handler has taken half its backlog: the window kept from
        its stream is given back."""
        if stream.closed or self.transport is None:
            return
        stream.consumed += stream.withheld
        stream.withheld = 0
        if stream.consumed >= STREAM_WINDOW // 2:
            self.out.append(
                _frame(WINDOW_UPDATE, 0, stream.sid, stream.consumed.to_bytes(4, "big"))
            )
            stream.consumed = 0
            self._flush()

    def _stray_data(self, sid: int, stream: _Stream | None) -> None:
        """DATA for no open stream (RFC 9113 6.1, 5.1)."""
        if sid == 0 or sid > self.last_sid:
            raise _ConnectionError(PROTOCOL_ERROR)  # the connection's, or an idle stream
        if stream is not None:
            self._reset(sid, STREAM_CLOSED, stream)  # the client had ended it
        elif sid not in self.reset_sids:  # sent before the client saw our reset: dropped
            self._strike()
            self._reset(sid, STREAM_CLOSED)

    def _read_messages(self, stream: _Stream, data: bytes | memoryview) -> None:
        """Split the stream's bytes into gRPC messages (1-byte flag, 4-byte length)."""
        end = len(data)
        if stream.need < 0 and not stream.size and end >= 5 and stream.requests is None:
            # A unary call's whole message in one frame, the usual case: no joins.
            need = int.from_bytes(data[1:5], "big")
            if end == 5 + need and data[0] == 0 and need <= self.server.max_receive:
                stream.messages.append(bytes(data[5:]))
                return
        if not end:
            return
        if stream.need >= 0 and stream.size + end < stream.need:
            stream.parts.append(data)  # the middle of a large message: the usual case
            stream.size += end
            return
        view = memoryview(data)
        pos = 0
        while pos < end:
            if stream.need < 0:
                take = min(5 - stream.size, end - pos)
                stream.parts.append(view[pos : pos + take])
                stream.size += take
                pos += take
                if stream.size < 5:
                    return
                prefix = b"".join(stream.parts)
                stream.parts = []
                stream.size = 0
                stream.compressed = prefix[0] == 1
                stream.need = int.from_bytes(prefix[1:5], "big")
                if stream.need > self.server.max_receive:
                    self._status(
                        stream,
                        RESOURCE_EXHAUSTED_CODE,
                        f"Received message larger than max ({stream.need} vs. "
                        f"{self.server.max_receive})",
                    )
                    return
            take = min(stream.need - stream.size, end - pos)
            if take:
                stream.parts.append(view[pos : pos + take])
                stream.size += take
                pos += take
            if stream.size == stream.need:
                parts = stream.parts
                message = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
                stream.parts = []
                stream.size = 0
                stream.need = -1
                if stream.compressed or stream.inflating:
                    self._inflate(stream, message, stream.compressed)
                elif stream.requests is not None:
                    stream.requests.put(message)
                else:
                    stream.messages.append(message)

    def _inflate(self, stream: _Stream, message: bytes, compressed: bool) -> None:
        """Queue ``message`` for inflation in steps of INFLATE_STEP bytes, one step per
        loop iteration: a bomb that inflates to the message limit then costs other
        clients a few ms between steps, not the ~0.1 s of one zlib call. Messages behind
        a compressed one on the same stream wait in the queue, so they keep their order."""
        if stream.inflating is None:
            stream.inflating = deque()
        try:
            inflation = _Inflation(message, stream.encoding if compressed else None)
        except _CallError as exc:
            self._status(stream, exc.code, exc.message)
            return
        stream.inflating.append(inflation)
        if len(stream.inflating) == 1:
            self.loop.call_soon(self._inflate_step, stream)

    def _inflate_step(self, stream: _Stream) -> None:
        """One step of the stream's first inflation; a finished message goes to its call,
        an error to the client; the next step or message on the next loop iteration."""
        queue = stream.inflating
        if stream.closed or self.transport is None or not queue:
            stream.inflating = None
            return
        try:
            message = queue[0].step(self.server.max_receive)
        except _CallError as exc:
            stream.inflating = None
            self._status(stream, exc.code, exc.message)
            self._flush()
            return
        if message is not None:
            queue.popleft()
            if stream.requests is not None:
                stream.requests.put(message)
            else:
                stream.messages.append(message)
            if not queue and stream.remote_closed:
                self._end_of_requests(stream)
                if self.starting:
                    self._start_calls()
                self._flush()
        if queue:
            self.loop.call_soon(self._inflate_step, stream)

    def _end_of_requests(self, stream: _Stream) -> None:
        stream.remote_closed = True
        if stream.closed or stream.method is None:
            if stream.closed and not stream.pending and stream.trailers is None:
                self._forget(stream)
            return
        if stream.inflating:
            return  # the last message inflated comes back here (_inflate_step)
        if stream.need >= 0 or stream.size:
            self._status(stream, INTERNAL_CODE, "the request ended inside a message")
            return
        if stream.requests is not None:
            stream.requests.put(None)
            return
        if len(stream.messages) != 1:
            code = UNIMPLEMENTED_CODE if stream.messages else INTERNAL_CODE
            self._status(stream, code, f"expected one request message, got {len(stream.messages)}")
            return
        # Started once the whole read is parsed: a reset in the same read (rapid reset)
        # ends the call before it costs anything.
        self.starting.append(stream)

    def _start_calls(self) -> None:
        starting = self.starting
        self.starting = []
        for stream in starting:
            method = stream.method
            if stream.closed or method is None:
                continue
            if method.start is None:
                fields = stream.fields if self.server.forward is not None else None
                stream.task = self.loop.create_task(self._run(stream, method, fields))
                continue
            try:
                stream.task = method.start(stream.messages.pop(), partial(self._answer, stream))
            except Exception as exc:
                log.exception("gRPC call %s failed", _path_of(self, method))
                self._status(stream, UNKNOWN_CODE, f"Unexpected {type(exc)}: {exc}")

    # --- calls ----------------------------------------------------------------------------

    def _answer(self, stream: _Stream, response: bytes | None, code: int, message: str) -> None:
        """How a call started without a task (``MethodHandler.start``) ends."""
        if code != OK:
            self._status(stream, int(code), message)
        elif response is not None and self._send_message(stream, response):
            self._finish(stream, OK_TRAILERS)

    async def _run(
        self, stream: _Stream, method: _Method, fields: dict[bytes, bytes] | None = None
    ) -> None:
        """Run one call's handler; a status ends the call however the handler ends."""
        context = CallContext(fields)
        try:
            if method.streaming:
                done = await self._stream_responses(stream, method, context)
            else:
                done = await self._unary_response(stream, method, context)
        except _Abort:
            self._status(stream, context.code, context.details)
            return
        except asyncio.CancelledError:
            return
        except Exception as exc:
            log.exception("gRPC call %s failed", _path_of(self, method))
            self._status(stream, UNKNOWN_CODE, f"Unexpected {type(exc)}: {exc}")
            return
        if done:
            self._finish(stream, OK_TRAILERS)

    async def _unary_response(self, stream: _Stream, method: _Method, context: CallContext) -> bool:
        request: Any = stream.messages.pop()
        if method.deserializer is not None:
            request = method.deserializer(request)
        response = await method.behaviour(request, context)
        if method.serializer is not None:
            response = method.serializer(response)
        return self._send_message(stream, response)

    async def _stream_responses(
        self, stream: _Stream, method: _Method, context: CallContext
    ) -> bool:
        """Send the handler's responses. The next one is taken only once the last is
        sent (written to the transport, below its high-water mark): a client that does
        not read holds the handler back, not our memory. The handler is closed however
        this ends (its ``finally`` cancels what it has in flight)."""
        responses: AsyncIterator = method.behaviour(stream.requests, context)
        try:
            async for response in responses:
                if stream.closed:
                    break
                if method.serializer is not None:
                    response = method.serializer(response)
                if not self._send_message(stream, response):
                    return False
                self._flush()
                while (stream.pending or self.write_paused) and not stream.closed:
                    stream.waiter = self.loop.create_future()
                    await stream.waiter
        finally:
            aclose = getattr(responses, "aclose", None)
            if aclose is not None:
                await aclose()
        return True

    def _wake(self, stream: _Stream) -> None:
        waiter = stream.waiter
        if waiter is not None:
            stream.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _expire(self, stream: _Stream) -> None:
        stream.timer = None
        if stream.closed:
            return
        task = stream.task
        self._status(stream, DEADLINE_CODE, "Deadline Exceeded")
        if task is not None and not task.done():
            task.cancel()

    def _cancel(self, stream: _Stream) -> None:
        """The client reset the stream or went away, or a stream error: the call ends,
        and what it waits on (its task, or the future ``start`` gave) is cancelled."""
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if not stream.closed and stream.method is not None:
            self.server.call_finished()
        stream.closed = True
        stream.pending.clear()
        stream.trailers = None
        self._wake(stream)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    def _reset(self, sid: int, code: int, stream: _Stream | None = None) -> None:
        """A stream error: RST_STREAM with ``code``; the stream's call, if any, is
        cancelled."""
        self.out.append(_frame(RST_STREAM, 0, sid, code.to_bytes(4, "big")))
        self._remember_reset(sid)
        if stream is not None:
            self.streams.pop(sid, None)
            self._cancel(stream)
            self._forget(stream)

    def _remember_reset(self, sid: int) -> None:
        reset = self.reset_sids
        reset[sid] = None
        if len(reset) > _RESET_MEMORY:
            del reset[next(iter(reset))]

    # --- writing --------------------------------------------------------------------------

    def _send_message(self, stream: _Stream, message: bytes) -> bool:
        """Queue one response message; False (and the call ended with
        RESOURCE_EXHAUSTED) when it is larger than the send limit."""
        if stream.closed:
            return False
        if len(message) > self.server.max_send:
            self._status(
                stream,
                RESOURCE_EXHAUSTED_CODE,
                f"Sent message larger than max ({len(message)} vs. {self.server.max_send})",
            )
            return False
        if not stream.headers_sent:
            stream.headers_sent = True
            self.out.append(_frame(HEADERS, END_HEADERS, stream.sid, RESPONSE_HEADERS))
        n = len(message)
        stream.pending.append(b"\x00" + n.to_bytes(4, "big"))
        if n:
            stream.pending.append(memoryview(message))
        self._send_stream(stream)
        return True

    def _status(self, stream: _Stream, code: int, message: str) -> None:
        """End the call with a non-OK status (Trailers-Only when nothing was sent yet)."""
        if stream.closed:
            return
        if stream.headers_sent:
            stream.pending.clear()
            self._finish(stream, _status_block(code, message, False))
        else:
            stream.headers_sent = True
            self._finish(stream, _status_block(code, message, True))
        if stream.task is not None and not stream.task.done():
            if stream.task is not asyncio.current_task():
                stream.task.cancel()
        self._flush()

    def _finish(self, stream: _Stream, trailers: bytes) -> None:
        if stream.closed:
            return
        stream.closed = True
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if stream.method is not None:
            self.server.call_finished()
        if stream.requests is not None:
            stream.requests.put(asyncio.CancelledError())
        self._wake(stream)
        stream.trailers = trailers
        self._send_stream(stream)
        self._flush()

    def _send_pending(self) -> None:
        for stream in list(self.streams.values()):
            if stream.pending or stream.trailers is not None:
                self._send_stream(stream)
                if self.send_window <= 0:
                    break

    def _send_stream(self, stream: _Stream) -> None:
        """Send what the windows allow of the stream's pending bytes, then its trailers
        once nothing is pending."""
        out = self.out
        pending = stream.pending
        max_frame = self.peer_max_frame
        while pending:
            room = min(stream.send_window, self.send_window)
            if room <= 0:
                return
            chunk = pending[0]
            if len(chunk) > max_frame and room > max_frame:
                # A large piece: as many full frames as the windows allow, in one go.
                size = len(chunk)
                frames = min(size, room) // max_frame
                header = _frame_header(DATA, 0, stream.sid, max_frame)
                for i in range(0, frames * max_frame, max_frame):
                    out.append(header)
                    out.append(chunk[i : i + max_frame])
                taken = frames * max_frame
                stream.send_window -= taken
                self.send_window -= taken
                if taken == size:
                    pending.popleft()
                else:
                    pending[0] = chunk[taken:]
                continue
            room = min(room, max_frame)
            if len(chunk) <= room:
                pending.popleft()
                # Small pieces (the 5-byte prefix and a small message) go in one frame.
                while pending and len(chunk) + len(pending[0]) <= room and len(chunk) < 4096:
                    chunk = bytes(chunk) + bytes(pending.popleft())
            else:
                pending[0] = chunk[room:]
                chunk = chunk[:room]
            n = len(chunk)
            stream.send_window -= n
            self.send_window -= n
            out.append(_frame_header(DATA, 0, stream.sid, n))
            out.append(chunk)
        if stream.waiter is not None and not self.write_paused:
            self._wake(stream)
        if stream.trailers is not None:
            out.append(_frame(HEADERS, END_HEADERS | END_STREAM, stream.sid, stream.trailers))
            stream.trailers = None
            if stream.remote_closed:
                self._forget(stream)
            else:
                # The client may still be sending: tell it to stop.
                out.append(_frame(RST_STREAM, 0, stream.sid, NO_ERROR.to_bytes(4, "big")))
                self._remember_reset(stream.sid)
                self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        self.streams.pop(stream.sid, None)
        if self.going_away and not self.streams and self.transport is not None:
            self._flush()
            self.transport.close()


class _ConnectionError(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class _CallError(Exception):
    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message


# Bytes of inflated output per loop iteration (~5 ms of zlib here).
INFLATE_STEP = 4 << 20


class _Inflation:
    """One message of a stream on its way to its call: inflated step by step (or, for
    an uncompressed message queued behind a compressed one, passed through)."""

    __slots__ = ("data", "inflater", "chunks", "size")

    def __init__(self, data: bytes, encoding: str | None) -> None:
        """Raises _CallError UNIMPLEMENTED for an unknown encoding."""
        self.data = data
        self.inflater = None if encoding is None else zlib.decompressobj(_wbits(encoding))
        self.chunks: list[bytes] = []
        self.size = 0

    def step(self, limit: int) -> bytes | None:
        """Inflate up to INFLATE_STEP more bytes: the whole message once done, else None.
        Never more than ``limit`` + 1 bytes are produced (a compression bomb costs what
        the limit allows, no more). Raises _CallError: RESOURCE_EXHAUSTED past ``limit``,
        INTERNAL for corrupt data."""
        if self.inflater is None:
            return self.data
        try:
            piece = self.inflater.decompress(self.data, min(INFLATE_STEP, limit + 1 - self.size))
        except zlib.error as exc:
            raise _CallError(INTERNAL_CODE, f"Failed to decompress the message: {exc}") from None
        self.data = self.inflater.unconsumed_tail
        self.chunks.append(piece)
        self.size += len(piece)
        if self.size > limit:
            raise _CallError(
                RESOURCE_EXHAUSTED_CODE,
                f"Received message larger than max (more than {limit} bytes once decompressed)",
            )
        if self.data or (piece and not self.inflater.eof):
            return None  # input left, or output that did not fit in this step
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)


def _wbits(encoding: str) -> int:
    """zlib's window bits for a grpc-encoding; _CallError UNIMPLEMENTED for others."""
    if encoding == "gzip":
        return 16 + zlib.MAX_WBITS
    if encoding == "deflate":
        return zlib.MAX_WBITS
    raise _CallError(
        UNIMPLEMENTED_CODE, f"Compression algorithm '{encoding or 'identity'}' is disabled."
    )


def _timeout(value: bytes) -> float | None:
    """A grpc-timeout in seconds: 1 to 8 ASCII digits and a unit; None if malformed."""
    digits = value[:-1]
    unit = _TIMEOUT_UNITS.get(value[-1:])
    if unit is None or not 0 < len(digits) <= 8 or not digits.isdigit():
        return None
    return int(digits) * unit


def _path_of(conn: _Connection, method: _Method) -> str:
    for path, m in conn.server.methods.items():
        if m is method:
            return path
    return "?"
