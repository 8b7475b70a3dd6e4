"""The lean gRPC transport (services/frontend/grpc/h2/), against grpc's own client
and raw HTTP/2 frames: calls, statuses, deadlines, cancellation, limits, compression,
streams, flow control and protocol errors."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import zlib

import grpc
import numpy as np
import pytest
import uvloop
from hpack import Encoder, NeverIndexedHeaderTuple

from despina.services.frontend.grpc import h2
from despina.services.frontend.grpc.errors import Status
from despina.services.frontend.grpc.h2 import connection as h2connection
from despina.services.frontend.grpc.h2 import frames as h2frames
from despina.services.frontend.grpc.h2 import headers as h2headers
from despina.services.frontend.grpc.h2 import messages as h2messages

LIMIT = 8 << 20


class Server:
    """An H2Server on its own loop in a thread, with test handlers."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.starts = 0  # calls of Started that were started
        self.taken = 0  # messages the Stream handler took
        self.loop = uvloop.new_event_loop()
        self.port = 0
        ready = threading.Event()

        async def echo(request: bytes, context) -> bytes:
            return request

        async def fail(request: bytes, context) -> bytes:
            await context.abort(Status.INVALID_ARGUMENT, "bad 100% \u00e9 input")
            raise AssertionError

        async def slow(request: bytes, context) -> bytes:
            try:
                await asyncio.sleep(float(request or b"30"))
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return b"late"

        async def big(request: bytes, context) -> bytes:
            return b"x" * int(request)

        async def crash(request: bytes, context) -> bytes:
            raise RuntimeError("boom")

        async def stream(requests, context):
            async for message in requests:
                self.taken += 1
                yield message + b"!"

        handlers = {
            f"/t.S/{name}": h2.MethodHandler(fn, None, None, streaming=False)
            for name, fn in (
                ("Echo", echo),
                ("Fail", fail),
                ("Slow", slow),
                ("Big", big),
                ("Crash", crash),
            )
        }
        handlers["/t.S/Stream"] = h2.MethodHandler(stream, None, None, streaming=True)

        def start(request: bytes, answer, state=None):
            """A call started without a task: answers at once, or from a future."""
            self.starts += 1
            if request == b"now":
                answer(request + b"!", Status.OK, "")
                return None
            if request == b"fail":
                answer(None, Status.INVALID_ARGUMENT, "no")
                return None
            if request == b"crash":
                raise RuntimeError("boom")
            pending = self.loop.create_future()
            self.loop.call_later(
                float(request), lambda: pending.done() or pending.set_result(request + b"!")
            )

            def done(f: asyncio.Future) -> None:
                if f.cancelled():
                    self.cancelled.set()
                else:
                    answer(f.result(), Status.OK, "")

            pending.add_done_callback(done)
            return pending

        handlers["/t.S/Started"] = h2.MethodHandler(echo, None, None, False, start)

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = h2.H2Server(handlers, LIMIT, LIMIT)
            self.loop.run_until_complete(self.server.listen("127.0.0.1", 0, False))
            self.port = self.server._servers[0].sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def stop(self, grace: float | None = 0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(30)

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.close()


def channel(server: Server, **options) -> grpc.Channel:
    opts = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    return grpc.insecure_channel(f"127.0.0.1:{server.port}", options=opts + list(options.items()))


def call(ch: grpc.Channel, name: str, request: bytes, **kw) -> bytes:
    return ch.unary_unary(f"/t.S/{name}")(request, **kw)


def test_unary_calls_large_messages_and_statuses(server):
    with channel(server) as ch:
        assert call(ch, "Echo", b"hi", timeout=10) == b"hi"
        assert call(ch, "Echo", b"", timeout=10) == b""
        big = bytes(range(256)) * (5 << 12)  # 5 MiB, past the default flow-control windows
        assert call(ch, "Echo", big, timeout=30) == big
        assert len(call(ch, "Big", b"6000000", timeout=30)) == 6_000_000
        with pytest.raises(grpc.RpcError) as info:
            call(ch, "Fail", b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "bad 100% \u00e9 input"
        with pytest.raises(grpc.RpcError) as info:
            call(ch, "Nope", b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as info:
            call(ch, "Crash", b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNKNOWN
        assert "boom" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            call(ch, "Echo", bytes(LIMIT + 1), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as info:
            call(ch, "Big", str(LIMIT + 1).encode(), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Sent message larger than max" in info.value.details()
        # The connection still serves after all of that.
        assert call(ch, "Echo", b"again", timeout=10) == b"again"


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_compressed_requests(server, compression):
    with channel(server) as ch:
        data = b"abc" * 100_000
        assert call(ch, "Echo", data, timeout=10, compression=compression) == data


def assert_deadline_and_cancel_stop(server: Server, ch: grpc.Channel, method: str) -> None:
    """A call of ``method`` that would take 30 s: its deadline ends it at once, and so
    does the client cancelling it; either way the server cancels what it waited on."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        call(ch, method, b"30", timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    assert server.cancelled.wait(5)
    server.cancelled.clear()
    future = ch.unary_unary(f"/t.S/{method}").future(b"30", timeout=30)
    time.sleep(0.3)
    future.cancel()
    assert server.cancelled.wait(5)


def test_deadline_and_cancellation_stop_the_handler(server):
    with channel(server) as ch:
        assert_deadline_and_cancel_stop(server, ch, "Slow")
        assert call(ch, "Slow", b"0", timeout=10) == b"late"


def test_calls_started_without_a_task(server):
    with channel(server) as ch:
        assert call(ch, "Started", b"now", timeout=10) == b"now!"
        assert call(ch, "Started", b"0.01", timeout=10) == b"0.01!"
        with pytest.raises(grpc.RpcError) as info:
            call(ch, "Started", b"fail", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "no"
        with pytest.raises(grpc.RpcError) as info:
            call(ch, "Started", b"crash", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNKNOWN
        assert "boom" in info.value.details()
        assert_deadline_and_cancel_stop(server, ch, "Started")
        assert call(ch, "Started", b"now", timeout=10) == b"now!"


def test_bidirectional_stream(server):
    with channel(server) as ch:
        stream = ch.stream_stream("/t.S/Stream")
        replies = list(stream(iter([b"a", b"b" * 100_000, b"c"]), timeout=10))
        assert replies == [b"a!", b"b" * 100_000 + b"!", b"c!"]
        assert list(stream(iter([]), timeout=10)) == []


def test_many_concurrent_calls_on_one_connection(server):
    with channel(server) as ch:
        futures = [ch.unary_unary("/t.S/Echo").future(str(i).encode()) for i in range(200)]
        assert [f.result(timeout=30) for f in futures] == [str(i).encode() for i in range(200)]


def test_stop_lets_calls_in_flight_finish(server):
    with channel(server) as ch:
        future = ch.unary_unary("/t.S/Slow").future(b"0.5", timeout=30)
        time.sleep(0.2)
        server.stop(grace=10)
        assert future.result(timeout=30) == b"late"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).recv(1)


# --- raw frames ------------------------------------------------------------------------


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return bytes((n >> 16, (n >> 8) & 255, n & 255, kind, flags)) + sid.to_bytes(4, "big") + payload


def read_frames(sock: socket.socket, until, timeout: float = 5.0) -> list:
    """Frames (kind, flags, sid, payload) read until ``until(frames)`` is true."""
    sock.settimeout(timeout)
    buf = b""
    frames: list = []
    while not until(frames):
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            n = int.from_bytes(buf[:3], "big")
            frames.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big"), buf[9 : 9 + n]))
            buf = buf[9 + n :]
    return frames


def test_flow_control_holds_data_for_a_small_window(server):
    encoder = Encoder()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        # The client allows 100 bytes per stream.
        settings = h2frames.INITIAL_WINDOW_SIZE.to_bytes(2, "big") + (100).to_bytes(4, "big")
        headers = encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/t.S/Big"),
                (":authority", "x"),
                ("content-type", "application/grpc"),
            ]
        )
        body = b"\x00" + (4).to_bytes(4, "big") + b"1000"
        sock.sendall(
            h2frames.PREFACE
            + frame(h2frames.SETTINGS, 0, 0, settings)
            + frame(h2frames.HEADERS, h2frames.END_HEADERS, 1, headers)
            + frame(h2frames.DATA, h2frames.END_STREAM, 1, body)
        )

        def data_bytes(frames):
            return sum(len(f[3]) for f in frames if f[0] == h2frames.DATA and f[2] == 1)

        frames = read_frames(sock, lambda fs: data_bytes(fs) >= 100)
        time.sleep(0.3)
        sock.setblocking(False)
        try:
            extra = sock.recv(1 << 16)
        except BlockingIOError:
            extra = b""
        assert data_bytes(frames) == 100 and not extra  # held at the window
        sock.sendall(frame(h2frames.WINDOW_UPDATE, 0, 1, (10_000).to_bytes(4, "big")))
        sock.setblocking(True)
        more = read_frames(
            sock,
            lambda fs: any(f[0] == h2frames.HEADERS and f[1] & h2frames.END_STREAM for f in fs),
        )
        assert data_bytes(frames) + data_bytes(more) == 1005  # prefix + message


def test_data_past_the_connection_window_is_a_flow_control_error(server, monkeypatch):
    """A peer that sends more DATA than the connection window it was granted (here 1 MiB,
    topped up once half is used) gets GOAWAY FLOW_CONTROL_ERROR (RFC 9113 6.9.1)."""
    window = 1 << 20
    monkeypatch.setattr(h2connection, "RECV_WINDOW", window)
    encoder = Encoder()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        block = encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/t.S/Echo"),
                (":authority", "x"),
                ("content-type", "application/grpc"),
            ]
        )
        first = b"\x00" + (4 << 20).to_bytes(4, "big") + b"a" * (window // 2 - 6)
        sock.sendall(
            h2frames.PREFACE
            + frame(h2frames.SETTINGS, 0, 0)
            + frame(h2frames.HEADERS, h2frames.END_HEADERS, 1, block)
            + frame(h2frames.DATA, 0, 1, first)  # just under half: no update yet
        )
        # Granted: the window; sent: one byte more.
        sock.sendall(frame(h2frames.DATA, 0, 1, b"b" * (window // 2 + 2)))
        frames = read_frames(sock, lambda fs: any(f[0] == h2frames.GOAWAY for f in fs))
        goaway = [f[3] for f in frames if f[0] == h2frames.GOAWAY]
        assert goaway and int.from_bytes(goaway[0][4:8], "big") == h2frames.FLOW_CONTROL_ERROR
        assert not any(f[0] == h2frames.WINDOW_UPDATE and f[2] == 0 for f in frames[2:])


def test_bad_preface_and_unknown_frames(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        frames = read_frames(sock, lambda fs: any(f[0] == h2frames.GOAWAY for f in fs))
        goaway = [f for f in frames if f[0] == h2frames.GOAWAY][0]
        assert int.from_bytes(goaway[3][4:8], "big") == h2frames.PROTOCOL_ERROR
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        # An unknown frame type is ignored; a PING is answered.
        sock.sendall(
            h2frames.PREFACE
            + frame(h2frames.SETTINGS, 0, 0)
            + frame(0xAB, 0, 0, b"?")
            + frame(h2frames.PING, 0, 0, b"12345678")
        )
        frames = read_frames(sock, lambda fs: any(f[0] == h2frames.PING for f in fs))
        assert [f[3] for f in frames if f[0] == h2frames.PING] == [b"12345678"]


REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/t.S/Echo"),
    (b":authority", b"x"),
    (b"content-type", b"application/grpc"),
]


@pytest.mark.parametrize(
    "extra, malformed",
    [
        ([], False),
        ([(b"x-v", b"a b\tc")], False),
        ([(b"x-v", b"a\rb")], True),
        ([(b"x-v", b"a\nb")], True),
        ([(b"x-v", b"a\x00b")], True),
    ],
    ids=["plain", "space-and-tab", "cr", "lf", "nul"],
)
def test_field_values_with_cr_lf_or_nul_are_malformed(extra, malformed):
    """RFC 9113 8.2.1: a value with CR, LF or NUL makes a request, or trailers, malformed;
    other characters do not."""
    assert h2headers.parse_head(REQUEST + extra).request_error is malformed
    assert h2headers.parse_head(extra).trailer_error is malformed


def test_a_pseudo_header_value_with_lf_is_malformed():
    fields = [
        (b":path", b"/t.S/Echo\n") if name == b":path" else (name, value) for name, value in REQUEST
    ]
    assert h2headers.parse_head(fields).request_error


def test_header_cache_follows_the_dynamic_table():
    """Blocks that leave HPACK's dynamic table alone are cached; one that changes it
    empties the cache, since the same indexed bytes may then mean other headers."""
    decoder = h2headers.HeaderDecoder(frozenset(), None)
    encoder = Encoder()
    head = decoder.decode(encoder.encode([("content-type", "application/grpc+a")]))
    assert head.content_type == b"application/grpc+a"
    indexed = encoder.encode([("content-type", "application/grpc+a")])
    assert indexed == b"\xbe"  # the first dynamic entry
    assert decoder.decode(indexed).content_type == b"application/grpc+a"
    assert indexed in decoder.heads
    assert decoder.decode(encoder.encode([("content-type", "application/grpc+b")]))
    assert not decoder.heads and decoder.heads_bytes == 0
    assert decoder.decode(b"\xbe").content_type == b"application/grpc+b"  # now the newest


def test_header_cache_is_bounded_by_bytes():
    """Distinct blocks that leave the table alone fill the cache up to its byte budget
    only; a block larger than HEADER_CACHE_BLOCK is never kept."""
    decoder = h2headers.HeaderDecoder(frozenset(), None)
    encoder = Encoder()
    big = encoder.encode([NeverIndexedHeaderTuple("x-big", "v" * 2000)], huffman=False)
    assert not big[0] & 0x40  # a literal not indexed: the table stays as it was
    decoder.decode(big)
    assert big not in decoder.heads
    for i in range(2000):
        block = encoder.encode([NeverIndexedHeaderTuple("x-n", f"{i:0300d}")], huffman=False)
        assert decoder.decode(block).size == 3 + 300 + 32
    assert decoder.heads_bytes <= h2headers.HEADER_CACHE_BYTES
    assert 0 < len(decoder.heads) <= h2headers.HEADER_CACHE_BYTES // (335 + 300)


def on_loop(server: Server, fn):
    """``fn()`` run on the server's loop, its result."""

    async def run():
        return fn()

    return asyncio.run_coroutine_threadsafe(run(), server.loop).result(10)


def connected(server: Server) -> h2connection.H2Connection:
    deadline = time.monotonic() + 5
    while not server.server.connections:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return next(iter(server.server.connections))


def test_a_peer_that_does_not_read_stops_being_read(server, monkeypatch):
    """PINGs under the flood limit from a client that does not read: once the transport's
    buffer passes its high-water mark the server reads no more, so its buffer stays
    bounded; once the client reads, every PING is answered."""
    monkeypatch.setattr(h2connection, "CONTROL_FRAMES_PER_SECOND", 10**9)
    pings = 300_000
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(h2frames.PREFACE + frame(h2frames.SETTINGS, 0, 0))
        conn = connected(server)
        data = frame(h2frames.PING, 0, 0, b"12345678") * pings
        sock.settimeout(0.5)
        sent = 0
        try:
            while sent < len(data):
                sent += sock.send(data[sent : sent + (1 << 16)])
        except TimeoutError:
            pass  # the server stopped reading: backpressure
        time.sleep(0.3)
        buffered = on_loop(server, lambda: conn.transport.get_write_buffer_size())
        assert on_loop(server, lambda: conn.write_paused)
        assert buffered < (64 << 10) + (512 << 10), buffered
        # Now read: the server resumes, and answers every PING that was sent.
        sock.settimeout(10)
        acks = 0
        received = b""
        try:
            while sent < len(data) or acks < pings:
                if sent < len(data):
                    sock.setblocking(False)
                    try:
                        sent += sock.send(data[sent : sent + (1 << 16)])
                    except BlockingIOError:
                        pass
                    sock.setblocking(True)
                    sock.settimeout(0.05)
                try:
                    received += sock.recv(1 << 20)
                except TimeoutError:
                    continue
                acks = received.count(b"\x00\x00\x08\x06\x01\x00\x00\x00\x0012345678")
        finally:
            sock.settimeout(10)
        assert acks == pings


def test_a_call_reset_in_the_same_read_never_starts(server):
    """HEADERS, DATA and RST_STREAM in one read (rapid reset): the call is not started;
    a call whose reset comes later is started, then cancelled."""
    encoder = Encoder()
    headers = encoder.encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/t.S/Started"),
            (":authority", "x"),
            ("content-type", "application/grpc"),
        ]
    )
    body = b"\x00" + (2).to_bytes(4, "big") + b"30"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            h2frames.PREFACE
            + frame(h2frames.SETTINGS, 0, 0)
            + b"".join(
                frame(h2frames.HEADERS, h2frames.END_HEADERS, sid, headers)
                + frame(h2frames.DATA, h2frames.END_STREAM, sid, body)
                + frame(h2frames.RST_STREAM, 0, sid, h2frames.CANCEL.to_bytes(4, "big"))
                for sid in range(1, 101, 2)
            )
            + frame(h2frames.PING, 0, 0, b"12345678")
        )
        read_frames(sock, lambda fs: any(f[0] == h2frames.PING for f in fs))
        assert server.starts == 0
        sock.sendall(
            frame(h2frames.HEADERS, h2frames.END_HEADERS, 101, headers)
            + frame(h2frames.DATA, h2frames.END_STREAM, 101, body)
            + frame(h2frames.PING, 0, 0, b"12345678")
        )
        read_frames(sock, lambda fs: any(f[0] == h2frames.PING for f in fs))
        assert server.starts == 1
        sock.sendall(frame(h2frames.RST_STREAM, 0, 101, h2frames.CANCEL.to_bytes(4, "big")))
        assert server.cancelled.wait(5)  # the future the call waited on was cancelled


def test_a_stream_without_window_takes_no_more_requests(server):
    """A streaming call whose client grants no window: its handler is not given the next
    request once a response cannot be sent; past STREAM_BACKLOG untaken requests the
    stream's window is kept; once the window opens, every response comes, in order."""
    encoder = Encoder()
    headers = encoder.encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/t.S/Stream"),
            (":authority", "x"),
            ("content-type", "application/grpc"),
        ]
    )
    count = 500
    messages = [f"{i:05d}".encode() for i in range(count)]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        settings = h2frames.INITIAL_WINDOW_SIZE.to_bytes(2, "big") + (0).to_bytes(4, "big")
        sock.sendall(
            h2frames.PREFACE
            + frame(h2frames.SETTINGS, 0, 0, settings)
            + frame(h2frames.HEADERS, h2frames.END_HEADERS, 1, headers)
            + b"".join(
                frame(h2frames.DATA, 0, 1, b"\x00" + (5).to_bytes(4, "big") + m) for m in messages
            )
            + frame(h2frames.PING, 0, 0, b"12345678")
        )
        read_frames(sock, lambda fs: any(f[0] == h2frames.PING for f in fs))
        time.sleep(0.2)
        conn = connected(server)
        assert server.taken <= 2
        assert on_loop(server, lambda: conn.streams[1].requests.held)
        assert on_loop(server, lambda: conn.streams[1].withheld) > 0
        sock.sendall(
            frame(h2frames.WINDOW_UPDATE, 0, 1, (1 << 20).to_bytes(4, "big"))
            + frame(h2frames.DATA, h2frames.END_STREAM, 1)
        )
        frames = read_frames(
            sock,
            lambda fs: any(f[0] == h2frames.HEADERS and f[1] & h2frames.END_STREAM for f in fs),
        )
        body = b"".join(f[3] for f in frames if f[0] == h2frames.DATA)
        replies = [body[i + 5 : i + 11] for i in range(0, len(body), 11)]
        assert replies == [m + b"!" for m in messages]
        assert server.taken == count


@pytest.mark.parametrize("wbits, encoding", [(31, "gzip"), (15, "deflate")])
def test_inflation_runs_in_steps_and_gives_the_message_back_whole(wbits, encoding):
    """A message that inflates past INFLATE_STEP comes back whole after several steps
    (each one loop iteration in the server), byte for byte."""
    data = (
        np.random.default_rng(0)
        .integers(0, 4, 3 * h2messages.INFLATE_STEP + 123)
        .astype(np.uint8)
        .tobytes()
    )
    packer = zlib.compressobj(wbits=wbits)
    inflation = h2messages.Inflation(packer.compress(data) + packer.flush(), encoding)
    steps, out = 0, None
    while out is None:
        out = inflation.step(len(data))
        steps += 1
    assert out == data
    assert steps >= 4


def test_inflation_refuses_a_bomb_past_the_limit_without_inflating_it_all():
    bomb = zlib.compress(bytes(64 << 20))
    inflation = h2messages.Inflation(bomb, "deflate")
    limit = 8 << 20
    with pytest.raises(h2messages.CallError) as info:
        while inflation.step(limit) is None:
            pass
    assert info.value.code == h2messages.RESOURCE_EXHAUSTED_CODE
    assert inflation.size == limit + 1  # never more than the limit + 1 bytes produced


def test_inflation_errors():
    with pytest.raises(h2messages.CallError) as info:
        h2messages.Inflation(b"x", "snappy")
    assert info.value.code == h2messages.UNIMPLEMENTED_CODE
    with pytest.raises(h2messages.CallError) as info:
        h2messages.Inflation(b"not deflate at all", "deflate").step(1 << 20)
    assert info.value.code == h2messages.INTERNAL_CODE
    assert h2messages.Inflation(b"plain", None).step(10) == b"plain"
