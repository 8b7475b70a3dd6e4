"""``H2Connection``: one client connection's HTTP/2 (RFC 9113) as a server: it reads
frames, answers the control frames, keeps the stream table, the flow-control windows both
ways and the flood counters, and writes what the calls queue. What a stream carries (gRPC
messages, calls, statuses) is ``Calls``' job; header blocks are ``HeaderDecoder``'s."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from despina.services.frontend.grpc.h2.calls import Calls, Stream, wake
from despina.services.frontend.grpc.h2.frames import (
    ACK,
    CONTINUATION,
    DATA,
    ENABLE_PUSH,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    NO_ERROR,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    H2ConnectionError,
    frame,
    frame_header,
    unpad,
)
from despina.services.frontend.grpc.h2.headers import (
    HARD_HEADER_LIST,
    MAX_HEADER_LIST,
    HeaderDecoder,
)

if TYPE_CHECKING:
    from despina.services.frontend.grpc.h2.server import H2Server

MAX_WINDOW = 2**31 - 1
# What this server lets a peer send on the connection before it says more; topped up once
# half is used. A peer that sends more than it was granted gets FLOW_CONTROL_ERROR.
RECV_WINDOW = 2**30
# Each stream's window (SETTINGS_INITIAL_WINDOW_SIZE), also topped up once half is used
# (docs/architecture.md#h2-windows): what a streaming call's requests may hold beyond
# STREAM_BACKLOG untaken messages. A stream sent past it is reset with FLOW_CONTROL_ERROR.
STREAM_WINDOW = 16 << 20

# Frames that cost work and run no call (PING, SETTINGS, PRIORITY, empty DATA, CONTINUATION
# or unknown frames, resets or DATA of closed streams, refused streams), and resets of calls
# in flight (CVE-2023-44487), per connection: more within a second ends the connection with
# GOAWAY ENHANCE_YOUR_CALM. Counted, and checked against the clock only past the limit.
CONTROL_FRAMES_PER_SECOND = 1000
RESETS_PER_SECOND = 200
# Streams reset by this server whose late frames are still ignored, not refused.
_RESET_MEMORY = 64


class H2Connection(asyncio.Protocol):
    """One client connection. Everything runs on the loop: no method is safe from
    another thread. Frame handlers raise ``H2ConnectionError`` for a connection error
    (``data_received`` answers it with GOAWAY and closes) and answer stream errors
    themselves (RST_STREAM, or a gRPC status through ``Calls``). Owns ``out``, the
    frames and message pieces written at the end of each read."""

    # Slots: every access on the path per call stays specialised
    # (docs/architecture.md#h2-slots).
    __slots__ = (
        "server",
        "transport",
        "buf",
        "preface",
        "headers",
        "streams",
        "last_sid",
        "going_away",
        "send_window",
        "peer_initial_window",
        "peer_max_frame",
        "consumed",
        "header_block",
        "header_sid",
        "header_end_stream",
        "header_self_dependent",
        "out",
        "reset_sids",
        "loop",
        "strikes",
        "strikes_since",
        "resets",
        "resets_since",
        "write_paused",
        "calls",
    )

    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.preface = False
        self.headers = HeaderDecoder(server.wanted, server.forward)
        self.streams: dict[int, Stream] = {}
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
        self.reset_sids: dict[int, None] = {}  # streams we reset, newest last
        self.loop = asyncio.get_running_loop()
        # Flood counters (see CONTROL_FRAMES_PER_SECOND): a count, and when it restarted.
        self.strikes = 0
        self.strikes_since = self.loop.time()
        self.resets = 0
        self.resets_since = self.strikes_since
        self.write_paused = False
        self.calls = Calls(self)

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
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, (RECV_WINDOW - 65535).to_bytes(4, "big"))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        for stream in list(self.streams.values()):
            self.calls.cancel(stream)
        self.streams.clear()
        self.calls.starting = []

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
                wake(stream)

    def goaway(self, code: int = NO_ERROR) -> None:
        """Take no new streams; close once the open ones have ended."""
        if self.transport is None or self.going_away:
            return
        self.going_away = True
        self.transport.write(
            frame(GOAWAY, 0, 0, self.last_sid.to_bytes(4, "big") + code.to_bytes(4, "big"))
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
        self.flush()
        self.transport.write(
            frame(GOAWAY, 0, 0, self.last_sid.to_bytes(4, "big") + code.to_bytes(4, "big"))
        )
        self.transport.close()
        self.buf = bytearray()
        self.calls.starting = []

    def flush(self) -> None:
        """Write what ``out`` holds."""
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
                raise H2ConnectionError(ENHANCE_YOUR_CALM)
            self.strikes_since = now
            self.strikes = 1

    def _count_reset(self) -> None:
        """The peer reset a call in flight; past RESETS_PER_SECOND within a second, a
        connection error (ENHANCE_YOUR_CALM): the rapid-reset attack."""
        self.resets += 1
        if self.resets > RESETS_PER_SECOND:
            now = self.loop.time()
            if now - self.resets_since < 1.0:
                raise H2ConnectionError(ENHANCE_YOUR_CALM)
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
                        raise H2ConnectionError(ENHANCE_YOUR_CALM)
                    break
                flags = source[pos + 4]
                sid = int.from_bytes(source[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                start = pos + 9
                pos = start + length
                if self.header_block is not None and kind != CONTINUATION:
                    raise H2ConnectionError(PROTOCOL_ERROR)
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
                        raise H2ConnectionError(PROTOCOL_ERROR)
                    if length != 8:
                        raise H2ConnectionError(FRAME_SIZE_ERROR)
                    self._strike()
                    if not flags & ACK:
                        self.out.append(frame(PING, ACK, 0, payload))
                elif kind == RST_STREAM:
                    self._on_rst_stream(sid, payload)
                elif kind == PRIORITY:
                    self._on_priority(sid, payload)
                elif kind == GOAWAY:
                    if sid:
                        raise H2ConnectionError(PROTOCOL_ERROR)
                    if length < 8:
                        raise H2ConnectionError(FRAME_SIZE_ERROR)
                    self.going_away = True
                elif kind == PUSH_PROMISE:
                    raise H2ConnectionError(PROTOCOL_ERROR)
                else:
                    self._strike()  # unknown frame types are ignored, and counted
                if self.transport is None:
                    break
        except H2ConnectionError as exc:
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
        if self.calls.starting:
            self.calls.start_calls()
        self.flush()

    def _on_settings(self, sid: int, flags: int, payload: bytes) -> None:
        if sid:
            raise H2ConnectionError(PROTOCOL_ERROR)
        if flags & ACK:
            if payload:
                raise H2ConnectionError(FRAME_SIZE_ERROR)
            return
        if len(payload) % 6:
            raise H2ConnectionError(FRAME_SIZE_ERROR)
        self._strike()
        for i in range(0, len(payload), 6):
            key = int.from_bytes(payload[i : i + 2], "big")
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2ConnectionError(FLOW_CONTROL_ERROR)
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise H2ConnectionError(FLOW_CONTROL_ERROR)
            elif key == MAX_FRAME_SIZE:
                if not 16384 <= value <= MAX_FRAME:
                    raise H2ConnectionError(PROTOCOL_ERROR)
                self.peer_max_frame = value
            elif key == ENABLE_PUSH:
                if value > 1:
                    raise H2ConnectionError(PROTOCOL_ERROR)
            # HEADER_TABLE_SIZE: our header blocks use no dynamic table.
        self.out.append(frame(SETTINGS, ACK, 0))
        self._send_pending()

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2ConnectionError(FRAME_SIZE_ERROR)
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if not increment:
                raise H2ConnectionError(PROTOCOL_ERROR)
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise H2ConnectionError(FLOW_CONTROL_ERROR)
            self._send_pending()
            return
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last_sid:
                raise H2ConnectionError(PROTOCOL_ERROR)  # an idle stream
            return  # a closed one: its update may have crossed our end of it
        if not increment:
            self.reset(sid, PROTOCOL_ERROR, stream)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self.reset(sid, FLOW_CONTROL_ERROR, stream)
            return
        self.send_stream(stream)

    def _on_rst_stream(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2ConnectionError(PROTOCOL_ERROR)
        if len(payload) != 4:
            raise H2ConnectionError(FRAME_SIZE_ERROR)
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last_sid:
                raise H2ConnectionError(PROTOCOL_ERROR)  # an idle stream
            self._strike()
            return
        self._count_reset()
        del self.streams[sid]
        self.calls.cancel(stream)
        self.forget(stream)

    def _on_priority(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2ConnectionError(PROTOCOL_ERROR)
        self._strike()
        if len(payload) != 5:
            self.reset(sid, FRAME_SIZE_ERROR, self.streams.get(sid))
        elif int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == sid:
            self.reset(sid, PROTOCOL_ERROR, self.streams.get(sid))

    def _on_headers(self, sid: int, flags: int, payload: bytes) -> None:
        if sid == 0 or sid % 2 == 0:
            raise H2ConnectionError(PROTOCOL_ERROR)
        block = unpad(flags, payload)
        self_dependent = False
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise H2ConnectionError(FRAME_SIZE_ERROR)
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
            raise H2ConnectionError(PROTOCOL_ERROR)
        if not payload and not flags & END_HEADERS:
            self._strike()
        self.header_block += payload
        if len(self.header_block) > HARD_HEADER_LIST:
            raise H2ConnectionError(ENHANCE_YOUR_CALM)
        if flags & END_HEADERS:
            block = bytes(self.header_block)
            self.header_block = None
            self._on_header_block(sid, block, self.header_end_stream, self.header_self_dependent)

    def _on_header_block(
        self, sid: int, block: bytes, end_stream: bool, self_dependent: bool = False
    ) -> None:
        head = self.headers.decode(block)  # decoded whatever comes of it: HPACK's state
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from the client
            if stream.remote_closed:
                self.reset(sid, STREAM_CLOSED, stream)
            elif not end_stream or head.trailer_error or self_dependent:
                self.reset(sid, PROTOCOL_ERROR, stream)
            else:
                self.calls.end_of_requests(stream)
            return
        if sid <= self.last_sid:
            if sid in self.reset_sids:
                return  # trailers of a call we reset before the client knew
            # A closed stream (the last one), or a new id below the last (RFC 9113 5.1.1).
            raise H2ConnectionError(STREAM_CLOSED if sid == self.last_sid else PROTOCOL_ERROR)
        self.last_sid = sid
        if self.going_away:
            self.reset(sid, REFUSED_STREAM)
            return
        if head.request_error or self_dependent:
            self.reset(sid, PROTOCOL_ERROR)
            return
        if len(self.streams) >= self.server.max_concurrent_streams:
            self._strike()
            self.reset(sid, REFUSED_STREAM)
            return
        stream = Stream(sid, self.peer_initial_window)
        self.streams[sid] = stream
        stream.remote_closed = end_stream
        self.calls.open(stream, head, end_stream)

    def _on_data(self, sid: int, flags: int, payload: bytes | memoryview) -> None:
        size = len(payload)
        # The connection's window: what the peer was granted and has not used up
        # (docs/architecture.md#h2-windows).
        consumed = self.consumed + size
        if consumed > RECV_WINDOW:
            raise H2ConnectionError(FLOW_CONTROL_ERROR)
        if consumed >= RECV_WINDOW // 2:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, consumed.to_bytes(4, "big")))
            consumed = 0
        self.consumed = consumed
        stream = self.streams.get(sid)
        if stream is None or stream.remote_closed:
            self._stray_data(sid, stream)
            return
        if not size and not flags & END_STREAM:
            self._strike()
        if stream.consumed + stream.withheld + size > STREAM_WINDOW:
            self.reset(sid, FLOW_CONTROL_ERROR, stream)  # sent past the stream's window
            return
        requests = stream.requests
        if requests is not None and requests.held:
            stream.withheld += size
        else:
            stream.consumed += size
            if stream.consumed >= STREAM_WINDOW // 2:
                self.out.append(frame(WINDOW_UPDATE, 0, sid, stream.consumed.to_bytes(4, "big")))
                stream.consumed = 0
        data = unpad(flags, payload)
        if stream.method is not None and not stream.closed:
            self.calls.read_messages(stream, data)
        if flags & END_STREAM:
            self.calls.end_of_requests(stream)

    def caught_up(self, stream: Stream) -> None:
        """A streaming call's handler has taken half its backlog: the window kept from
        its stream is given back."""
        if stream.closed or self.transport is None:
            return
        stream.consumed += stream.withheld
        stream.withheld = 0
        if stream.consumed >= STREAM_WINDOW // 2:
            self.out.append(frame(WINDOW_UPDATE, 0, stream.sid, stream.consumed.to_bytes(4, "big")))
            stream.consumed = 0
            self.flush()

    def _stray_data(self, sid: int, stream: Stream | None) -> None:
        """DATA for no open stream (RFC 9113 6.1, 5.1)."""
        if sid == 0 or sid > self.last_sid:
            raise H2ConnectionError(PROTOCOL_ERROR)  # the connection's, or an idle stream
        if stream is not None:
            self.reset(sid, STREAM_CLOSED, stream)  # the client had ended it
        elif sid not in self.reset_sids:  # sent before the client saw our reset: dropped
            self._strike()
            self.reset(sid, STREAM_CLOSED)

    # --- streams --------------------------------------------------------------------------

    def reset(self, sid: int, code: int, stream: Stream | None = None) -> None:
        """A stream error: RST_STREAM with ``code``; the stream's call, if any, is
        cancelled."""
        self.out.append(frame(RST_STREAM, 0, sid, code.to_bytes(4, "big")))
        self._remember_reset(sid)
        if stream is not None:
            self.streams.pop(sid, None)
            self.calls.cancel(stream)
            self.forget(stream)

    def _remember_reset(self, sid: int) -> None:
        reset = self.reset_sids
        reset[sid] = None
        if len(reset) > _RESET_MEMORY:
            del reset[next(iter(reset))]

    def forget(self, stream: Stream) -> None:
        """The stream is done both ways; a connection going away closes after its last."""
        self.streams.pop(stream.sid, None)
        if self.going_away and not self.streams and self.transport is not None:
            self.flush()
            self.transport.close()

    # --- writing --------------------------------------------------------------------------

    def _send_pending(self) -> None:
        for stream in list(self.streams.values()):
            if stream.pending or stream.trailers is not None:
                self.send_stream(stream)
                if self.send_window <= 0:
                    break

    def send_stream(self, stream: Stream) -> None:
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
                header = frame_header(DATA, 0, stream.sid, max_frame)
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
            out.append(frame_header(DATA, 0, stream.sid, n))
            out.append(chunk)
        if stream.waiter is not None and not self.write_paused:
            wake(stream)
        if stream.trailers is not None:
            out.append(frame(HEADERS, END_HEADERS | END_STREAM, stream.sid, stream.trailers))
            stream.trailers = None
            if stream.remote_closed:
                self.forget(stream)
            else:
                # The client may still be sending: tell it to stop.
                out.append(frame(RST_STREAM, 0, stream.sid, NO_ERROR.to_bytes(4, "big")))
                self._remember_reset(stream.sid)
                self.forget(stream)
