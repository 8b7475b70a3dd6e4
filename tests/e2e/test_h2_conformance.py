"""RFC 9113's connection and stream errors against the gRPC frontend's own HTTP/2 server
(``h2server``), in the spirit of h2spec (which cannot be installed here): each case opens
a fresh TCP connection to a real ``despina serve``, sends the client preface, a SETTINGS
frame and the frames under test, and checks the GOAWAY or RST_STREAM error code the RFC
asks for; a stream error must leave the connection serving (a PING is answered after
it). After every case a normal ``tritonclient.grpc`` infer still works: no process was
restarted.

``RawH2`` is the raw client the security tests (test_security_grpc.py) use too.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hpack import Encoder
from tritonclient.grpc import service_pb2 as pb

from conftest import SHIPPED_REPOSITORY, DespinaServer

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
ENABLE_PUSH, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 2, 4, 5

NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM = 0x5, 0x6, 0x7
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return bytes((n >> 16, (n >> 8) & 255, n & 255, kind, flags)) + sid.to_bytes(4, "big") + payload


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def setting(key: int, value: int) -> bytes:
    return key.to_bytes(2, "big") + u32(value)


def grpc_message(message: bytes) -> bytes:
    return b"\x00" + u32(len(message)) + message


def simple_request(value: int = 3) -> bytes:
    """A serialized ModelInferRequest for ``simple`` (INT32 [1, 16] twice)."""
    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = name, "INT32"
        tensor.shape.extend([1, 16])
        request.raw_input_contents.append(np.full(16, value, np.int32).tobytes())
    return request.SerializeToString()


def slow_request(sleep_ms: int) -> bytes:
    """A serialized ModelInferRequest for the ``slow`` python model."""
    request = pb.ModelInferRequest(model_name="slow")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "SLEEP_MS", "INT32"
    tensor.shape.extend([1])
    request.raw_input_contents.append(np.array([sleep_ms], np.int32).tobytes())
    return request.SerializeToString()


def request_fields(
    path: str = INFER_PATH, content_type: str = "application/grpc", extra=()
) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", content_type),
        ("te", "trailers"),
        *extra,
    ]


class RawH2:
    """A raw HTTP/2 client on one TCP connection: frames in and out, no checks of its own."""

    def __init__(self, port: int, settings: bytes = b"", preface: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.encoder = Encoder()
        self.buf = b""
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.closed = False
        if preface:
            self.send(PREFACE + frame(SETTINGS, 0, 0, settings))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, *data: bytes) -> None:
        self.sock.sendall(b"".join(data))

    def block(self, fields, huffman: bool = True) -> bytes:
        return self.encoder.encode(fields, huffman=huffman)

    def headers(
        self, sid: int, fields=None, end_stream: bool = False, flags: int = END_HEADERS
    ) -> bytes:
        block = self.block(request_fields() if fields is None else fields)
        return frame(HEADERS, flags | (END_STREAM if end_stream else 0), sid, block)

    def data(self, sid: int, payload: bytes, end_stream: bool = True) -> bytes:
        """``payload`` in DATA frames of at most 16 KiB (the default SETTINGS_MAX_FRAME_SIZE)."""
        pieces = [payload[i : i + 16384] for i in range(0, len(payload), 16384)] or [b""]
        return b"".join(
            frame(DATA, END_STREAM if end_stream and i == len(pieces) - 1 else 0, sid, piece)
            for i, piece in enumerate(pieces)
        )

    def call(self, sid: int, message: bytes, fields=None) -> bytes:
        """HEADERS and one DATA frame with END_STREAM: a whole unary call."""
        return self.headers(sid, fields) + frame(DATA, END_STREAM, sid, grpc_message(message))

    def read_until(self, until: Callable[[], bool], timeout: float = 10.0) -> None:
        """Read frames into ``frames`` until ``until()`` or the connection closes."""
        deadline = time.monotonic() + timeout
        while not until() and not self.closed:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 20)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            except TimeoutError:
                raise AssertionError(f"timed out; frames so far: {self.summary()}") from None
            if not chunk:
                self.closed = True
                break
            self.buf += chunk
            while len(self.buf) >= 9 and len(self.buf) >= 9 + int.from_bytes(self.buf[:3], "big"):
                n = int.from_bytes(self.buf[:3], "big")
                b = self.buf
                self.frames.append((b[3], b[4], int.from_bytes(b[5:9], "big"), b[9 : 9 + n]))
                self.buf = b[9 + n :]

    def summary(self) -> list[tuple[int, int, int, int]]:
        return [(k, f, s, len(p)) for k, f, s, p in self.frames]

    def goaway(self, timeout: float = 10.0) -> tuple[int, int]:
        """(last stream id, error code) of the server's GOAWAY; the connection must close."""
        self.read_until(lambda: self.closed, timeout)
        found = [f for f in self.frames if f[0] == GOAWAY]
        assert found, f"no GOAWAY: {self.summary()}"
        payload = found[-1][3]
        return int.from_bytes(payload[:4], "big") & 0x7FFFFFFF, int.from_bytes(payload[4:8], "big")

    def rst(self, sid: int, timeout: float = 10.0) -> int:
        """The error code of the server's RST_STREAM on ``sid``."""
        self.read_until(lambda: any(f[0] == RST_STREAM and f[2] == sid for f in self.frames))
        found = [f for f in self.frames if f[0] == RST_STREAM and f[2] == sid]
        assert found, f"no RST_STREAM on {sid}: {self.summary()}"
        return int.from_bytes(found[0][3], "big")

    def response(self, sid: int) -> tuple[dict[bytes, bytes], bytes]:
        """The headers and trailers of ``sid``'s response (one dict) and its DATA."""
        from hpack import Decoder

        def ended() -> bool:
            return any(
                f[2] == sid and (f[0] == RST_STREAM or (f[0] in (HEADERS, DATA) and f[1] & 1))
                for f in self.frames
            )

        self.read_until(ended)
        decoder = Decoder()
        fields: dict[bytes, bytes] = {}
        body = b""
        for kind, _, stream, payload in self.frames:
            if kind == HEADERS:
                decoded = dict(decoder.decode(payload, raw=True))
                if stream == sid:
                    fields.update(decoded)
            elif kind == DATA and stream == sid:
                body += payload
        return fields, body

    def alive(self) -> None:
        """The connection still serves: a PING is answered, and no GOAWAY came."""
        self.send(frame(PING, 0, 0, b"alive!!!"))
        self.read_until(lambda: any(f[0] == PING and f[3] == b"alive!!!" for f in self.frames))
        assert not self.closed and not any(f[0] == GOAWAY for f in self.frames), self.summary()


def assert_infer_works(server: DespinaServer) -> None:
    """A normal tritonclient.grpc infer on a fresh channel."""
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            tensor = grpcclient.InferInput(name, [1, 16], "INT32")
            tensor.set_data_from_numpy(a)
            inputs.append(tensor)
        result = client.infer("simple", inputs, client_timeout=10)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), 0 * a)


@pytest.fixture(scope="module")
def h2_server(tmp_path_factory, generator):
    repo = tmp_path_factory.mktemp("h2-repo")
    (repo / "simple").symlink_to(SHIPPED_REPOSITORY / "simple")
    generator.python_slow(repo)
    srv = DespinaServer(repo, tmp_path_factory.mktemp("h2-logs") / "serve.log").start()
    yield srv
    srv.stop()


# --- connection errors: (name, frames after the preface and SETTINGS, GOAWAY code) --------


def _open(c: RawH2, sid: int = 1) -> bytes:
    """HEADERS that open ``sid`` (a ModelInfer whose message has not come yet)."""
    return c.headers(sid)


def _closed_then(c: RawH2, then: Callable[[RawH2], bytes]) -> bytes:
    """Stream 1 runs a whole call, its answer is read, then ``then``'s frames go."""
    c.send(c.call(1, simple_request()))
    fields, _ = c.response(1)
    assert fields[b"grpc-status"] == b"0"
    return then(c)


CONNECTION_ERRORS: list[tuple[str, Callable[[RawH2], bytes], int]] = [
    ("ping-length-7", lambda c: frame(PING, 0, 0, b"1234567"), FRAME_SIZE_ERROR),
    ("ping-on-stream", lambda c: frame(PING, 0, 1, b"12345678"), PROTOCOL_ERROR),
    ("settings-on-stream", lambda c: frame(SETTINGS, 0, 1, b""), PROTOCOL_ERROR),
    ("settings-length-5", lambda c: frame(SETTINGS, 0, 0, b"\0" * 5), FRAME_SIZE_ERROR),
    ("settings-ack-with-payload", lambda c: frame(SETTINGS, ACK, 0, b"\0" * 6), FRAME_SIZE_ERROR),
    ("enable-push-2", lambda c: frame(SETTINGS, 0, 0, setting(ENABLE_PUSH, 2)), PROTOCOL_ERROR),
    (
        "initial-window-past-max",
        lambda c: frame(SETTINGS, 0, 0, setting(INITIAL_WINDOW_SIZE, 2**31)),
        FLOW_CONTROL_ERROR,
    ),
    (
        "max-frame-size-too-small",
        lambda c: frame(SETTINGS, 0, 0, setting(MAX_FRAME_SIZE, 16383)),
        PROTOCOL_ERROR,
    ),
    (
        "max-frame-size-too-large",
        lambda c: frame(SETTINGS, 0, 0, setting(MAX_FRAME_SIZE, 2**24)),
        PROTOCOL_ERROR,
    ),
    ("rst-on-stream-0", lambda c: frame(RST_STREAM, 0, 0, u32(8)), PROTOCOL_ERROR),
    ("rst-on-idle-stream", lambda c: frame(RST_STREAM, 0, 5, u32(8)), PROTOCOL_ERROR),
    (
        "rst-length-3",
        lambda c: _open(c) + frame(RST_STREAM, 0, 1, b"\0\0\x08"),
        FRAME_SIZE_ERROR,
    ),
    ("data-on-stream-0", lambda c: frame(DATA, 0, 0, b"x"), PROTOCOL_ERROR),
    ("data-on-idle-stream", lambda c: frame(DATA, 0, 1, b"x"), PROTOCOL_ERROR),
    ("headers-on-stream-0", lambda c: c.headers(0), PROTOCOL_ERROR),
    ("headers-on-even-stream", lambda c: c.headers(2), PROTOCOL_ERROR),
    ("window-update-0-on-connection", lambda c: frame(WINDOW_UPDATE, 0, 0, u32(0)), PROTOCOL_ERROR),
    ("window-update-length-3", lambda c: frame(WINDOW_UPDATE, 0, 0, b"\0\0\1"), FRAME_SIZE_ERROR),
    (
        "connection-window-past-max",
        lambda c: frame(WINDOW_UPDATE, 0, 0, u32(2**31 - 1)),
        FLOW_CONTROL_ERROR,
    ),
    ("window-update-on-idle-stream", lambda c: frame(WINDOW_UPDATE, 0, 3, u32(1)), PROTOCOL_ERROR),
    (
        "stream-id-lower-than-last",
        lambda c: _open(c, 5) + _open(c, 3),
        PROTOCOL_ERROR,
    ),
    (
        "headers-on-closed-stream",
        lambda c: _closed_then(c, lambda c: c.headers(1, end_stream=True)),
        STREAM_CLOSED,
    ),
    ("continuation-without-headers", lambda c: frame(CONTINUATION, END_HEADERS, 1), PROTOCOL_ERROR),
    (
        "frame-between-headers-and-continuation",
        lambda c: c.headers(1, flags=0) + frame(PING, 0, 0, b"12345678"),
        PROTOCOL_ERROR,
    ),
    (
        "continuation-on-another-stream",
        lambda c: c.headers(1, flags=0) + frame(CONTINUATION, END_HEADERS, 3),
        PROTOCOL_ERROR,
    ),
    (
        "push-promise-from-client",
        lambda c: frame(PUSH_PROMISE, END_HEADERS, 1, u32(2)),
        PROTOCOL_ERROR,
    ),
    ("priority-on-stream-0", lambda c: frame(PRIORITY, 0, 0, u32(1) + b"\x10"), PROTOCOL_ERROR),
    ("goaway-on-stream", lambda c: frame(GOAWAY, 0, 1, u32(0) + u32(0)), PROTOCOL_ERROR),
    (
        "hpack-index-out-of-range",
        lambda c: frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\xff\x7f"),
        COMPRESSION_ERROR,
    ),
    (
        "headers-padding-past-frame",
        lambda c: frame(HEADERS, END_HEADERS | PADDED, 1, b"\x05\x82"),
        PROTOCOL_ERROR,
    ),
    (
        "header-block-past-the-hard-limit",
        lambda c: (
            c.headers(1, flags=0)
            + b"".join(frame(CONTINUATION, 0, 1, b"\0" * 16000) for _ in range(3))
        ),
        ENHANCE_YOUR_CALM,
    ),
]


@pytest.mark.parametrize(
    "make, code", [c[1:] for c in CONNECTION_ERRORS], ids=[c[0] for c in CONNECTION_ERRORS]
)
def test_connection_error(h2_server, make, code):
    with RawH2(h2_server.grpc_port) as c:
        c.send(make(c))
        _, got = c.goaway()
        assert got == code, f"GOAWAY {got:#x}, expected {code:#x}"
    assert_infer_works(h2_server)


def test_first_frame_must_be_settings(h2_server):
    with RawH2(h2_server.grpc_port, preface=False) as c:
        c.send(PREFACE + frame(PING, 0, 0, b"12345678"))
        assert c.goaway()[1] == PROTOCOL_ERROR
    assert_infer_works(h2_server)


def test_goaway_names_the_last_stream_processed(h2_server):
    with RawH2(h2_server.grpc_port) as c:
        c.send(c.call(1, simple_request()), c.call(3, simple_request()))
        assert c.response(3)[0][b"grpc-status"] == b"0"
        c.send(frame(PING, 0, 0, b"1234567"))
        assert c.goaway() == (3, FRAME_SIZE_ERROR)


# --- stream errors: (name, frames, stream, RST_STREAM code); the connection survives --------


def _fields_with(*extra, drop: str = "") -> list[tuple[str, str]]:
    return [f for f in request_fields(extra=extra) if f[0] != drop]


STREAM_WINDOW = 16 << 20  # the server's SETTINGS_INITIAL_WINDOW_SIZE


def _past_the_stream_window(sid: int) -> bytes:
    """DATA one byte past the stream's window: half of it less one byte (no update is
    due yet), then the rest and one byte more, in frames the server's MAX_FRAME_SIZE allows."""
    half = STREAM_WINDOW // 2
    first = grpc_message(b"x" * (3 * half))[: half - 1]
    return frame(DATA, 0, sid, first) + frame(DATA, 0, sid, b"x" * (half + 2))


STREAM_ERRORS: list[tuple[str, Callable[[RawH2], bytes], int, int]] = [
    (
        "window-update-0-on-stream",
        lambda c: _open(c) + frame(WINDOW_UPDATE, 0, 1, u32(0)),
        1,
        PROTOCOL_ERROR,
    ),
    (
        "stream-window-past-max",
        lambda c: _open(c) + frame(WINDOW_UPDATE, 0, 1, u32(2**31 - 1)),
        1,
        FLOW_CONTROL_ERROR,
    ),
    (
        "headers-depend-on-themselves",
        lambda c: frame(
            HEADERS, END_HEADERS | PRIORITY_FLAG, 1, u32(1) + b"\x10" + c.block(request_fields())
        ),
        1,
        PROTOCOL_ERROR,
    ),
    ("priority-on-itself", lambda c: frame(PRIORITY, 0, 3, u32(3) + b"\x10"), 3, PROTOCOL_ERROR),
    ("priority-length-4", lambda c: frame(PRIORITY, 0, 3, u32(1)), 3, FRAME_SIZE_ERROR),
    (
        "uppercase-field-name",
        lambda c: c.headers(1, _fields_with(("X-Upper", "1"))),
        1,
        PROTOCOL_ERROR,
    ),
    (
        "connection-specific-field",
        lambda c: c.headers(1, _fields_with(("connection", "keep-alive"))),
        1,
        PROTOCOL_ERROR,
    ),
    ("te-not-trailers", lambda c: c.headers(1, _fields_with(("te", "gzip"))), 1, PROTOCOL_ERROR),
    ("missing-path", lambda c: c.headers(1, _fields_with(drop=":path")), 1, PROTOCOL_ERROR),
    ("missing-method", lambda c: c.headers(1, _fields_with(drop=":method")), 1, PROTOCOL_ERROR),
    ("missing-scheme", lambda c: c.headers(1, _fields_with(drop=":scheme")), 1, PROTOCOL_ERROR),
    (
        "empty-path",
        lambda c: c.headers(1, [(":path", "") if f[0] == ":path" else f for f in request_fields()]),
        1,
        PROTOCOL_ERROR,
    ),
    (
        "duplicate-path",
        lambda c: c.headers(1, [(":path", INFER_PATH), *request_fields()]),
        1,
        PROTOCOL_ERROR,
    ),
    (
        "unknown-pseudo-header",
        lambda c: c.headers(1, [(":foo", "bar"), *request_fields()]),
        1,
        PROTOCOL_ERROR,
    ),
    (
        "response-pseudo-header",
        lambda c: c.headers(1, [(":status", "200"), *request_fields()]),
        1,
        PROTOCOL_ERROR,
    ),
    (
        "pseudo-header-after-regular",
        lambda c: c.headers(1, [*request_fields(), (":authority", "x")]),
        1,
        PROTOCOL_ERROR,
    ),
    (
        "trailers-without-end-stream",
        lambda c: _open(c) + c.headers(1, [("x-trailer", "1")]),
        1,
        PROTOCOL_ERROR,
    ),
    (
        "trailers-with-pseudo-header",
        lambda c: _open(c) + c.headers(1, [(":path", "/x")], end_stream=True),
        1,
        PROTOCOL_ERROR,
    ),
    # RFC 9113 8.2.1: a field value with CR, LF or NUL is malformed.
    ("value-with-cr", lambda c: c.headers(1, _fields_with(("x-v", "a\rb"))), 1, PROTOCOL_ERROR),
    ("value-with-lf", lambda c: c.headers(1, _fields_with(("x-v", "a\nb"))), 1, PROTOCOL_ERROR),
    ("value-with-nul", lambda c: c.headers(1, _fields_with(("x-v", "a\0b"))), 1, PROTOCOL_ERROR),
    (
        "pseudo-header-value-with-lf",
        lambda c: c.headers(
            1, [(":authority", "a\nb") if f[0] == ":authority" else f for f in request_fields()]
        ),
        1,
        PROTOCOL_ERROR,
    ),
    (
        "trailer-value-with-nul",
        lambda c: _open(c) + c.headers(1, [("x-trailer", "a\0b")], end_stream=True),
        1,
        PROTOCOL_ERROR,
    ),
    (
        "data-past-the-stream-window",
        lambda c: _open(c) + _past_the_stream_window(1),
        1,
        FLOW_CONTROL_ERROR,
    ),
    (
        "data-on-half-closed-stream",
        lambda c: c.call(1, slow_request(2000)) + frame(DATA, 0, 1, grpc_message(b"")),
        1,
        STREAM_CLOSED,
    ),
    (
        "data-on-closed-stream",
        lambda c: _closed_then(c, lambda c: frame(DATA, 0, 1, grpc_message(b""))),
        1,
        STREAM_CLOSED,
    ),
]


@pytest.mark.parametrize(
    "make, sid, code",
    [c[1:] for c in STREAM_ERRORS],
    ids=[c[0] for c in STREAM_ERRORS],
)
def test_stream_error(h2_server, make, sid, code):
    with RawH2(h2_server.grpc_port) as c:
        c.send(make(c))
        got = c.rst(sid)
        assert got == code, f"RST_STREAM {got:#x}, expected {code:#x}"
        c.alive()
        # And a whole call on the same connection still gets its answer.
        c.send(c.call(11, simple_request()))
        fields, body = c.response(11)
        assert fields[b"grpc-status"] == b"0", fields
        reply = pb.ModelInferResponse.FromString(body[5:])
        assert np.frombuffer(reply.raw_output_contents[0], np.int32).tolist() == [6] * 16
    assert_infer_works(h2_server)


# --- gRPC over HTTP/2 -----------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", None])
def test_non_grpc_content_type_gets_415(h2_server, content_type):
    fields = [f for f in request_fields() if f[0] != "content-type"]
    if content_type is not None:
        fields.append(("content-type", content_type))
    with RawH2(h2_server.grpc_port) as c:
        c.send(c.call(1, simple_request(), fields))
        response, _ = c.response(1)
        assert response[b":status"] == b"415"
        c.alive()
    assert_infer_works(h2_server)


def test_priority_frames_and_unknown_frames_are_ignored(h2_server):
    with RawH2(h2_server.grpc_port) as c:
        c.send(
            frame(PRIORITY, 0, 3, u32(0) + b"\x10"),
            frame(0xAB, 0, 0, b"extension"),
            c.call(1, simple_request()),
        )
        assert c.response(1)[0][b"grpc-status"] == b"0"
        c.alive()
