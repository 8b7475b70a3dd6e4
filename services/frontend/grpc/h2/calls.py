"""gRPC calls over HTTP/2 streams: what the servicer registers (``MethodHandler``) and sees
(``CallContext``), one stream's state (``Stream``), and ``Calls``, which runs the calls of
one connection: it splits a stream's bytes into messages, inflates them, starts the call
once its request is whole, and ends it with a status however it ends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from despina.services.frontend.grpc.h2.frames import END_HEADERS, HEADERS, frame
from despina.services.frontend.grpc.h2.headers import (
    MAX_HEADER_LIST,
    OK_TRAILERS,
    RESPONSE_HEADERS,
    UNSUPPORTED_MEDIA,
    Head,
    status_block,
)
from despina.services.frontend.grpc.h2.messages import (
    DEADLINE_CODE,
    INTERNAL_CODE,
    OK,
    RESOURCE_EXHAUSTED_CODE,
    UNIMPLEMENTED_CODE,
    UNKNOWN_CODE,
    CallError,
    Inflation,
)

if TYPE_CHECKING:
    from despina.services.frontend.grpc.h2.connection import H2Connection
    from despina.services.frontend.grpc.h2.server import H2Server

log = logging.getLogger("despina.frontend")

# Request messages a streaming call's handler has not taken yet: past it the stream's
# window is not topped up until the handler has taken half of them (flow control holds
# the client back; the connection reads on, so the client's WINDOW_UPDATEs still come).
STREAM_BACKLOG = 64
# Request header fields a streaming call's handler reads (``CallContext.invocation_metadata``):
# Triton's switch for ending a ModelStreamInfer stream with a request's error status.
STREAM_FIELDS = frozenset((b"triton_grpc_error",))


class Abort(Exception):
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
        raise Abort()


class MethodHandler(NamedTuple):
    """One method: ``behaviour(request, context)`` returns the response (unary) or, when
    ``streaming`` (bidirectional), takes an async iterator of requests and yields
    responses. A (de)serializer of None passes message bytes through.

    ``start`` (optional, unary methods without (de)serializers): the call without a task
    or coroutine (docs/architecture.md#h2-calls-without-a-task): ``start(request, answer,
    state)`` returns the future the call waits on, cancelled if the call ends first, or
    None once it has answered; it answers with ``answer(response, OK, "")`` or
    ``answer(None, status, message)``. ``state``: the connection's own object, made by
    ``H2Server``'s ``connection_state`` when the connection opened (a request memo), or
    None. While ``H2Server.stamping``, a fourth argument: the trace stamps of the
    request's receipt, ``[("GRPC_WAITREAD_START", ns), ("GRPC_WAITREAD_END", ns)]``.

    ``required`` (optional): (header name in lower case, value, status, message): a call
    without that header field of exactly that value (its first, if repeated) ends with
    that status before it starts (restricted protocols, ``frontend/restricted.py``)."""

    behaviour: Callable
    request_deserializer: Callable | None
    response_serializer: Callable | None
    streaming: bool
    start: Callable | None = None
    required: tuple[bytes, bytes, int, str] | None = None


class Method:
    """A ``MethodHandler`` as calls use it: ``start`` kept only where it applies."""

    __slots__ = ("streaming", "behaviour", "deserializer", "serializer", "start", "required")

    def __init__(self, handler: MethodHandler) -> None:
        self.streaming = handler.streaming
        self.required = handler.required
        self.behaviour = handler.behaviour
        self.deserializer = handler.request_deserializer
        self.serializer = handler.response_serializer
        raw = self.deserializer is None and self.serializer is None
        self.start = handler.start if raw and not self.streaming else None


class Requests:
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

    def __aiter__(self) -> Requests:
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


class Stream:
    """One HTTP/2 stream and the call on it: its windows and queued response bytes (the
    connection's), its request bytes, messages and task (the calls'). The response
    bytes in ``pending`` are owned here until written; the request ``parts`` are views
    of the read they came in, joined once a message is whole."""

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
        "opened",  # set only while H2Server.stamping
    )
    fields: dict[bytes, bytes] | None
    opened: int  # its request headers came (time.time_ns): GRPC_WAITREAD_START

    def __init__(self, sid: int, send_window: int) -> None:
        self.sid = sid
        self.method: Method | None = None
        self.encoding = ""
        self.deadline: float | None = None
        self.parts: list = []  # bytes of the message being read
        self.size = 0  # bytes in parts
        self.need = -1  # the message's length once its prefix is read
        self.compressed = False
        self.messages: list[bytes] = []  # unary: the request
        self.requests: Requests | None = None  # streaming
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
        self.inflating: deque[Inflation] | None = None  # messages being inflated, in order


def wake(stream: Stream) -> None:
    """Let a streaming call that waits for its sends take its next response."""
    waiter = stream.waiter
    if waiter is not None:
        stream.waiter = None
        if not waiter.done():
            waiter.set_result(None)


def path_of(server: H2Server, method: Method) -> str:
    for path, m in server.methods.items():
        if m is method:
            return path
    return "?"


class Calls:
    """The gRPC calls of one connection. The connection hands it each new stream's
    checked header block (``open``), the stream's bytes (``read_messages``), its end
    (``end_of_requests``) and its reset (``cancel``); it writes through the connection's
    ``out``, ``send_stream`` and ``flush``. Each call ends exactly once, in ``finish``
    (``status`` for a non-OK status), which gives the server's call count back. Runs on
    the loop only."""

    __slots__ = ("conn", "server", "loop", "starting", "state")

    def __init__(self, conn: H2Connection) -> None:
        self.conn = conn
        self.server = server = conn.server
        self.loop = conn.loop
        self.starting: list[Stream] = []  # calls complete in this read, started after it
        # This connection's object for ``MethodHandler.start`` (its request memo), or None
        make_state = server.connection_state
        self.state = None if make_state is None else make_state()

    # --- a call begins --------------------------------------------------------------------

    def open(self, stream: Stream, head: Head, end_stream: bool) -> None:
        """A new stream's request headers, well formed as HTTP/2: the call starts, or
        ends at once with a status (not gRPC, too large, bad timeout, unknown method,
        a required field missing)."""
        if not head.content_type.startswith(b"application/grpc"):
            stream.headers_sent = True
            self.finish(stream, UNSUPPORTED_MEDIA)
            return
        if head.size > MAX_HEADER_LIST:
            self.status(
                stream,
                RESOURCE_EXHAUSTED_CODE,
                f"header list of {head.size} bytes is larger than max ({MAX_HEADER_LIST})",
            )
            return
        if head.bad_timeout:
            self.status(stream, INTERNAL_CODE, "invalid grpc-timeout")
            return
        server = self.server
        method = server.methods.get(head.path)
        if method is None:
            self.status(stream, UNIMPLEMENTED_CODE, "Method not found!")
            return
        required = method.required
        if required is not None:
            fields = head.fields
            if fields is None or fields.get(required[0]) != required[1]:
                self.status(stream, required[2], required[3])
                return
        if server.stamping:
            stream.opened = time.time_ns()
        stream.encoding = head.encoding
        stream.deadline = head.timeout
        stream.method = method
        if server.forward is not None:
            stream.fields = head.fields  # a unary call's metadata, read when it starts
        server.call_started()
        if stream.deadline is not None:
            stream.timer = self.loop.call_later(stream.deadline, self.expire, stream)
        if method.streaming:
            stream.requests = Requests(method.deserializer, partial(self.conn.caught_up, stream))
            stream.task = self.loop.create_task(self.run(stream, method, head.fields))
        if end_stream:
            self.end_of_requests(stream)

    def read_messages(self, stream: Stream, data: bytes | memoryview) -> None:
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
                    self.status(
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
                    self.inflate(stream, message, stream.compressed)
                elif stream.requests is not None:
                    stream.requests.put(message)
                else:
                    stream.messages.append(message)

    def inflate(self, stream: Stream, message: bytes, compressed: bool) -> None:
        """Queue ``message`` for inflation in steps of INFLATE_STEP bytes, one step per
        loop iteration (docs/architecture.md#h2-inflation-steps). Messages behind a
        compressed one on the same stream wait in the queue, so they keep their order."""
        if stream.inflating is None:
            stream.inflating = deque()
        try:
            inflation = Inflation(message, stream.encoding if compressed else None)
        except CallError as exc:
            self.status(stream, exc.code, exc.message)
            return
        stream.inflating.append(inflation)
        if len(stream.inflating) == 1:
            self.loop.call_soon(self.inflate_step, stream)

    def inflate_step(self, stream: Stream) -> None:
        """One step of the stream's first inflation; a finished message goes to its call,
        an error to the client; the next step or message on the next loop iteration."""
        queue = stream.inflating
        if stream.closed or self.conn.transport is None or not queue:
            stream.inflating = None
            return
        try:
            message = queue[0].step(self.server.max_receive)
        except CallError as exc:
            stream.inflating = None
            self.status(stream, exc.code, exc.message)
            self.conn.flush()
            return
        if message is not None:
            queue.popleft()
            if stream.requests is not None:
                stream.requests.put(message)
            else:
                stream.messages.append(message)
            if not queue and stream.remote_closed:
                self.end_of_requests(stream)
                if self.starting:
                    self.start_calls()
                self.conn.flush()
        if queue:
            self.loop.call_soon(self.inflate_step, stream)

    def end_of_requests(self, stream: Stream) -> None:
        """The client ended the stream (END_STREAM, or trailers): a unary call is queued
        to start after this read; a streaming call's iterator ends."""
        stream.remote_closed = True
        if stream.closed or stream.method is None:
            if stream.closed and not stream.pending and stream.trailers is None:
                self.conn.forget(stream)
            return
        if stream.inflating:
            return  # the last message inflated comes back here (inflate_step)
        if stream.need >= 0 or stream.size:
            self.status(stream, INTERNAL_CODE, "the request ended inside a message")
            return
        if stream.requests is not None:
            stream.requests.put(None)
            return
        if len(stream.messages) != 1:
            code = UNIMPLEMENTED_CODE if stream.messages else INTERNAL_CODE
            self.status(stream, code, f"expected one request message, got {len(stream.messages)}")
            return
        # Started once the whole read is parsed: a reset in the same read (rapid reset)
        # ends the call before it costs anything.
        self.starting.append(stream)

    def start_calls(self) -> None:
        """Start the unary calls whose request came whole in the last read."""
        starting = self.starting
        self.starting = []
        for stream in starting:
            method = stream.method
            if stream.closed or method is None:
                continue
            if method.start is None:
                fields = stream.fields if self.server.forward is not None else None
                stream.task = self.loop.create_task(self.run(stream, method, fields))
                continue
            try:
                if self.server.stamping and hasattr(stream, "opened"):
                    received = [
                        ("GRPC_WAITREAD_START", stream.opened),
                        ("GRPC_WAITREAD_END", time.time_ns()),
                    ]
                    stream.task = method.start(
                        stream.messages.pop(), partial(self.answer, stream), self.state, received
                    )
                else:
                    stream.task = method.start(
                        stream.messages.pop(), partial(self.answer, stream), self.state
                    )
            except Exception as exc:
                log.exception("gRPC call %s failed", path_of(self.server, method))
                self.status(stream, UNKNOWN_CODE, f"Unexpected {type(exc)}: {exc}")

    # --- a call runs ----------------------------------------------------------------------

    def answer(self, stream: Stream, response: bytes | None, code: int, message: str) -> None:
        """How a call started without a task (``MethodHandler.start``) ends."""
        if code != OK:
            self.status(stream, int(code), message)
        elif response is not None and self.send_message(stream, response):
            self.finish(stream, OK_TRAILERS)

    async def run(
        self, stream: Stream, method: Method, fields: dict[bytes, bytes] | None = None
    ) -> None:
        """Run one call's handler; a status ends the call however the handler ends."""
        context = CallContext(fields)
        try:
            if method.streaming:
                done = await self.stream_responses(stream, method, context)
            else:
                done = await self.unary_response(stream, method, context)
        except Abort:
            self.status(stream, context.code, context.details)
            return
        except asyncio.CancelledError:
            return
        except Exception as exc:
            log.exception("gRPC call %s failed", path_of(self.server, method))
            self.status(stream, UNKNOWN_CODE, f"Unexpected {type(exc)}: {exc}")
            return
        if done:
            self.finish(stream, OK_TRAILERS)

    async def unary_response(self, stream: Stream, method: Method, context: CallContext) -> bool:
        request: Any = stream.messages.pop()
        if method.deserializer is not None:
            request = method.deserializer(request)
        response = await method.behaviour(request, context)
        if method.serializer is not None:
            response = method.serializer(response)
        return self.send_message(stream, response)

    async def stream_responses(self, stream: Stream, method: Method, context: CallContext) -> bool:
        """Send the handler's responses. The next one is taken only once the last is
        sent (written to the transport, below its high-water mark): a client that does
        not read holds the handler back, not our memory. The handler is closed however
        this ends (its ``finally`` cancels what it has in flight)."""
        responses: AsyncIterator = method.behaviour(stream.requests, context)
        conn = self.conn
        try:
            async for response in responses:
                if stream.closed:
                    break
                if method.serializer is not None:
                    response = method.serializer(response)
                if not self.send_message(stream, response):
                    return False
                self.conn.flush()
                while (stream.pending or conn.write_paused) and not stream.closed:
                    stream.waiter = self.loop.create_future()
                    await stream.waiter
        finally:
            aclose = getattr(responses, "aclose", None)
            if aclose is not None:
                await aclose()
        return True

    # --- a call ends ----------------------------------------------------------------------

    def send_message(self, stream: Stream, message: bytes) -> bool:
        """Queue one response message; False (and the call ended with
        RESOURCE_EXHAUSTED) when it is larger than the send limit."""
        if stream.closed:
            return False
        if len(message) > self.server.max_send:
            self.status(
                stream,
                RESOURCE_EXHAUSTED_CODE,
                f"Sent message larger than max ({len(message)} vs. {self.server.max_send})",
            )
            return False
        if not stream.headers_sent:
            stream.headers_sent = True
            self.conn.out.append(frame(HEADERS, END_HEADERS, stream.sid, RESPONSE_HEADERS))
        n = len(message)
        stream.pending.append(b"\x00" + n.to_bytes(4, "big"))
        if n:
            stream.pending.append(memoryview(message))
        self.conn.send_stream(stream)
        return True

    def expire(self, stream: Stream) -> None:
        stream.timer = None
        if stream.closed:
            return
        task = stream.task
        self.status(stream, DEADLINE_CODE, "Deadline Exceeded")
        if task is not None and not task.done():
            task.cancel()

    def cancel(self, stream: Stream) -> None:
        """The client reset the stream or went away, or a stream error: the call ends
        with nothing sent, and what it waits on (its task, or the future ``start`` gave)
        is cancelled."""
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if not stream.closed and stream.method is not None:
            self.server.call_finished()
        stream.closed = True
        stream.pending.clear()
        stream.trailers = None
        wake(stream)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    def status(self, stream: Stream, code: int, message: str) -> None:
        """End the call with a non-OK status (Trailers-Only when nothing was sent yet)."""
        if stream.closed:
            return
        if stream.headers_sent:
            stream.pending.clear()
            self.finish(stream, status_block(code, message, False))
        else:
            stream.headers_sent = True
            self.finish(stream, status_block(code, message, True))
        if stream.task is not None and not stream.task.done():
            if stream.task is not asyncio.current_task():
                stream.task.cancel()
        self.conn.flush()

    def finish(self, stream: Stream, trailers: bytes) -> None:
        """End the call: ``trailers`` go out once its pending bytes have."""
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
        wake(stream)
        stream.trailers = trailers
        self.conn.send_stream(stream)
        self.conn.flush()
