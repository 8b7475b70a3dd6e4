"""Fuzzing the frontends (#12): hypothesis generates hostile HTTP/1.1 requests, gRPC
messages and HTTP/2 frame sequences and sends them to one real ``despina serve``.

Every answer must be a clean refusal or a success (HTTP below 500, gRPC one of the codes
a client can act on), every answer must come within a few seconds (a hang fails the
example), and after the run the same processes, never restarted, answer a normal
inference correctly.

Budget: ``DESPINA_FUZZ_EXAMPLES`` examples per strategy (default 300; about 20 s for the
whole module on a 2-core VM). CI runs derandomized (the same examples every run, so a
find is reproducible and never flaky); a local run explores new ones each time and
hypothesis prints the failing example. Raise the budget for a longer campaign:
``DESPINA_FUZZ_EXAMPLES=5000 pytest tests/e2e/test_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from conftest import SHIPPED_REPOSITORY, DespinaServer

EXAMPLES = int(os.environ.get("DESPINA_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)
ANSWER_WITHIN = 5.0  # seconds; longer is a hang

MODELS = ("simple", "identity_fp32", "simple_string")
DATATYPES = ("INT32", "FP32", "BYTES", "FP16", "BOOL", "UINT8", "INT64", "FP64", "BF16", "X")
GRPC_CLIENT_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    repo = tmp_path_factory.mktemp("fuzz-repo")
    for model in MODELS:
        shutil.copytree(SHIPPED_REPOSITORY / model, repo / model)
    # Client shared memory allowed: registration parses hostile JSON too. Heads that are
    # not (yet) a request, such as blank lines, are answered by the header timeout.
    srv = DespinaServer(
        repo,
        tmp_path_factory.mktemp("fuzz-logs") / "serve.log",
        ["--allow-client-shm=true", "--http-header-timeout-secs=2"],
    ).start()
    pids = {role: srv.child_pids(role) for role in ("frontend", "backend-host")}
    yield srv
    try:
        # The same processes, never restarted, still answer correctly.
        assert {role: srv.child_pids(role) for role in pids} == pids, srv.log()[-4000:]
        _assert_serves(srv)
    finally:
        srv.stop()


def _assert_serves(srv: DespinaServer) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    client = httpclient.InferenceServerClient(srv.url, network_timeout=10)
    inputs = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for inp in inputs:
        inp.set_data_from_numpy(a, binary_data=True)
    result = client.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)
    client.close()
    gclient = grpcclient.InferenceServerClient(srv.grpc_url)
    ginputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for inp in ginputs:
        inp.set_data_from_numpy(a)
    result = gclient.infer("simple", ginputs, client_timeout=10)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros_like(a))
    gclient.close()


# --- HTTP/1.1 ---------------------------------------------------------------------------


class RawHttp:
    """One keep-alive connection that sends raw requests and reads whole responses;
    reconnects after the server closes it (as it may after a malformed request)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""

    def exchange(self, request: bytes) -> int:
        """The response's status; raises on a hang. 0 when the server closed the
        connection without an answer (allowed only for requests that are not HTTP)."""
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=ANSWER_WITHIN)
            self.buf = b""
        try:
            self.sock.sendall(request)
            status, close = self._read_response()
        except (ConnectionResetError, BrokenPipeError):
            status, close = 0, True
        if close:
            self.close()
        return status

    def _read_response(self) -> tuple[int, bool]:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return 0, True
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        length = int(headers.get(b"content-length", b"0"))
        while len(self.buf) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                return status, True
            self.buf += chunk
        self.body = self.buf[:length]
        self.buf = self.buf[length:]
        return status, headers.get(b"connection") == b"close"

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


def _clean(status: int) -> bool:
    """A success or a refusal the client can act on (501: a feature not built yet)."""
    return 200 <= status < 500 or status == 501


def _bad_dim(body: object) -> bool:
    """Whether an input's JSON shape holds a dimension that is not an unsigned 64-bit integer:
    Triton answers that 500 ("Unable to parse 'shape' ..."), its qa tests check it, and
    Despina answers as Triton (docs/compatibility.md)."""
    inputs = body.get("inputs") if isinstance(body, dict) else None
    return isinstance(inputs, list) and any(
        isinstance(t, dict)
        and isinstance(t.get("shape"), list)
        and any(type(d) is not int or not 0 <= d < 1 << 64 for d in t["shape"])
        for t in inputs
    )


def _post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=24,
)
dims = st.integers(-3, 20) | st.sampled_from([2**31, 2**62, 2**63 - 1, 2**63, 2**64, -(2**63)])
shapes = st.lists(dims, max_size=4) | json_values


@st.composite
def tensor_json(draw):
    tensor = {
        "name": draw(st.sampled_from(["INPUT0", "INPUT1", "OUTPUT0", ""]) | st.text(max_size=6)),
        "datatype": draw(st.sampled_from(DATATYPES) | json_values),
        "shape": draw(shapes),
    }
    if draw(st.booleans()):
        tensor["data"] = draw(
            st.lists(st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=4), max_size=40)
            | json_values
        )
    if draw(st.booleans()):
        tensor["parameters"] = draw(
            st.dictionaries(
                st.sampled_from(
                    ["binary_data_size", "shared_memory_region", "shared_memory_offset", "x"]
                ),
                json_values,
                max_size=3,
            )
        )
    return tensor


@st.composite
def infer_body(draw):
    body = {"inputs": draw(st.lists(tensor_json(), max_size=3) | json_values)}
    if draw(st.booleans()):
        body["outputs"] = draw(
            st.lists(st.dictionaries(st.text(max_size=8), json_values), max_size=3)
        )
    if draw(st.booleans()):
        body["parameters"] = draw(st.dictionaries(st.text(max_size=12), json_values, max_size=3))
    if draw(st.booleans()):
        body["id"] = draw(json_values)
    return body


@given(model=st.sampled_from(MODELS), body=infer_body())
@FUZZ
def test_http_json_infer_bodies(target, model, body):
    conn = RawHttp(target.http_port)
    status = conn.exchange(_post(f"/v2/models/{model}/infer", json.dumps(body).encode()))
    assert _clean(status) or (status == 500 and _bad_dim(body)), (status, body)
    conn.close()


@given(
    model=st.sampled_from(MODELS),
    body=infer_body(),
    tail=st.binary(max_size=512),
    announced=st.integers(-5, 1 << 20) | st.just(None),
)
@FUZZ
def test_http_binary_extension_bodies(target, model, body, tail, announced):
    header = json.dumps(body).encode()
    length = len(header) if announced is None else announced
    request = _post(
        f"/v2/models/{model}/infer",
        header + tail,
        f"Inference-Header-Content-Length: {length}\r\n".encode(),
    )
    conn = RawHttp(target.http_port)
    status = conn.exchange(request)
    assert _clean(status) or (status == 500 and _bad_dim(body)), (status, body, length)
    conn.close()


ROUTES = [
    "/v2/models/{m}/infer",
    "/v2/models/{m}/versions/1/infer",
    "/v2/models/{m}/config",
    "/v2/models/{m}",
    "/v2/systemsharedmemory/region/{m}/register",
    "/v2/systemsharedmemory/region/{m}/unregister",
    "/v2/cudasharedmemory/region/{m}/register",
    "/v2/repository/index",
    "/v2/repository/models/{m}/load",
    "/v2/{m}",
]


@given(
    route=st.sampled_from(ROUTES),
    name=st.sampled_from(MODELS) | st.text(max_size=12),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    body=st.binary(max_size=2048) | json_values.map(lambda v: json.dumps(v).encode()),
)
@FUZZ
def test_http_any_route_any_body(target, route, name, method, body):
    from urllib.parse import quote

    path = route.format(m=quote(name, safe=""))
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    conn = RawHttp(target.http_port)
    status = conn.exchange(request)
    assert _clean(status), (status, method, path)
    conn.close()


@given(head=st.binary(min_size=1, max_size=600))
@FUZZ
def test_http_garbage_request_heads(target, head):
    """Bytes that are mostly not HTTP: a 4xx or a closed connection, never a hang."""
    conn = RawHttp(target.http_port)
    status = conn.exchange(head + b"\r\n\r\n")
    assert status == 0 or _clean(status), (status, head)
    conn.close()


# --- gRPC messages ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_infer(target):
    channel = grpc.insecure_channel(target.grpc_url)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    yield call
    channel.close()


def _call(call, message: bytes) -> grpc.StatusCode:
    try:
        call(message, timeout=ANSWER_WITHIN)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _valid_request(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        del tensor
        request.raw_input_contents.append(np.arange(16, dtype=np.int32).tobytes())
    return request


@given(message=st.binary(max_size=4096))
@FUZZ
def test_grpc_random_messages(target, model_infer, message):
    code = _call(model_infer, message)
    assert code in GRPC_CLIENT_CODES, (code, message)


@given(
    model=st.sampled_from(MODELS),
    cut=st.integers(0, 400),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
    insert=st.binary(max_size=16),
)
@FUZZ
def test_grpc_mutated_valid_messages(target, model_infer, model, cut, flips, insert):
    """A valid ModelInferRequest, truncated, with bytes changed and bytes inserted: the
    structure-aware cases random bytes rarely reach (varint lengths, nested tags)."""
    data = bytearray(_valid_request(model).SerializeToString())
    for where, value in flips:
        if where < len(data):
            data[where] = value
    at = cut % (len(data) + 1)
    data = data[:at] + insert + data[at:]
    code = _call(model_infer, bytes(data))
    assert code in GRPC_CLIENT_CODES, (code, bytes(data))


@given(
    model=st.sampled_from(MODELS) | st.text(max_size=6),
    tensors=st.lists(
        st.tuples(
            st.sampled_from(["INPUT0", "INPUT1", "x"]),
            st.sampled_from(DATATYPES),
            st.lists(st.integers(-3, 20) | st.sampled_from([2**31, 2**62, 2**63 - 1]), max_size=4),
            st.binary(max_size=256) | st.none(),
        ),
        max_size=3,
    ),
    outputs=st.lists(st.sampled_from(["OUTPUT0", "OUTPUT1", "y"]), max_size=3),
)
@FUZZ
def test_grpc_structured_requests(target, model_infer, model, tensors, outputs):
    request = pb.ModelInferRequest(model_name=model)
    raw = []
    for name, datatype, shape, data in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        raw.append(data)
    if all(d is not None for d in raw):
        request.raw_input_contents.extend(raw)
    for name in outputs:
        request.outputs.add(name=name)
    code = _call(model_infer, request.SerializeToString())
    assert code in GRPC_CLIENT_CODES, (code, request)


# --- HTTP/2 frames ------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


frames = st.lists(
    st.tuples(
        st.integers(0, 10),  # DATA .. CONTINUATION, and one unknown type
        st.integers(0, 255),
        st.sampled_from([0, 1, 3, 5, 2, 2**31 - 1]),
        st.binary(max_size=64),
    ),
    min_size=1,
    max_size=12,
)


@given(sequence=frames)
@FUZZ
def test_h2_frame_sequences(target, sequence):
    """Any frames after a valid preface: the server may answer, reset or close, but it
    never hangs on them, and the next client's call succeeds."""
    with socket.create_connection(("127.0.0.1", target.grpc_port), timeout=ANSWER_WITHIN) as sock:
        sock.sendall(PREFACE + _frame(4, 0, 0, b"") + b"".join(_frame(*f) for f in sequence))
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(65536):  # the server closes once it has seen our end
                pass
        except ConnectionResetError:
            pass
