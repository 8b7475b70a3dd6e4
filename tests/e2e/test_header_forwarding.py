"""Header forwarding as Triton (#14): ``--http-header-forward-pattern`` and
``--grpc-header-forward-pattern``. A request header (gRPC metadata) whose name the
pattern matches (searched, case-insensitive unless the pattern starts with ``(?-i)``)
reaches the model as a string request parameter named after the header in lower case; a
Python model reads it with ``request.parameters()``. Headers win over body parameters of
the same name; a matched header whose name Triton reserves is refused (HTTP 400, gRPC
INVALID_ARGUMENT); a pattern that is no regular expression stops the server.

Servers cover both transports of each protocol: ``lean`` (the lean HTTP/1.1 server and
h2server) and ``fallback`` (aiohttp and grpc.aio), plus one started without the flags,
where nothing is forwarded. The model answers its parameters as JSON."""

from __future__ import annotations

import json
import queue
import socket
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from despina.services.frontend.inference import compile_forward_pattern

from conftest import DespinaServer, serve_refused

MODEL = "params"
CONFIG = """name: "params"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ 1 ] } ]
"""
MODEL_PY = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(
                        "OUTPUT0",
                        np.array([r.parameters().encode()], dtype=np.object_),
                    )
                ]
            )
            for r in requests
        ]
"""
# Searched in the name, case-insensitive: "MY_HEADER" matches my_header_1; "^sequence_id$"
# lets a reserved name through, to be refused.
PATTERN = "MY_HEADER|^sequence_id$"
HEADERS = {
    "my_header_1": "my_value_1",
    "My-Header-Case": "ignored",  # '-' where the pattern has '_': does not match
    "x_my_header_2": 'This is a "quoted" string with a backslash\\',
    "header_1": "value_1",
}
FORWARDED = {"my_header_1": "my_value_1", "x_my_header_2": HEADERS["x_my_header_2"]}
SERVERS = {
    # name: (HTTP transport, gRPC transport, flags given)
    "lean": ("lean", "auto", True),
    "fallback": ("aiohttp", "grpcio", True),
    "off": ("lean", "auto", False),
}


def _repository(tmp_path_factory):
    repo = tmp_path_factory.mktemp("forward-repo")
    (repo / MODEL / "1").mkdir(parents=True)
    (repo / MODEL / "config.pbtxt").write_text(CONFIG)
    (repo / MODEL / "1" / "model.py").write_text(MODEL_PY)
    return repo


@pytest.fixture(scope="module", params=sorted(SERVERS))
def served(request, tmp_path_factory):
    """(name, server, whether headers are forwarded) of a started server."""
    name = request.param
    http_transport, grpc_transport, flags = SERVERS[name]
    args = (
        [f"--http-header-forward-pattern={PATTERN}", f"--grpc-header-forward-pattern={PATTERN}"]
        if flags
        else []
    )
    log = tmp_path_factory.mktemp(f"forward-{name}") / "serve.log"
    server = DespinaServer(
        _repository(tmp_path_factory),
        log,
        args,
        env={"DESPINA_HTTP_TRANSPORT": http_transport, "DESPINA_GRPC_TRANSPORT": grpc_transport},
    )
    server.start()
    try:
        yield name, server, flags
    finally:
        server.stop()


def _inputs(client):
    tensor = client.InferInput("INPUT0", [1], "FP32")
    tensor.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    return [tensor]


def _params(result) -> dict:
    return json.loads(result.as_numpy("OUTPUT0")[0])


def _expected(flags: bool, body: dict, forwarded: dict) -> dict:
    return {**body, **forwarded} if flags else dict(body)


def test_http_headers_reach_the_model(served):
    _, server, flags = served
    client = httpclient.InferenceServerClient(server.url)
    try:
        body = {"key1": "value1", "my_header_1": "from the body"}
        got = _params(
            client.infer(MODEL, _inputs(httpclient), parameters=body, headers=dict(HEADERS))
        )
        # The header wins over the body's parameter of the same name
        assert got == _expected(flags, body, FORWARDED)
        # The same request again (a memoized template on lean): its own headers count
        other = {"my_header_1": "second", "header_1": "x"}
        got = _params(client.infer(MODEL, _inputs(httpclient), parameters=body, headers=other))
        assert got == _expected(flags, body, {"my_header_1": "second"})
        got = _params(client.infer(MODEL, _inputs(httpclient), parameters=body))
        assert got == body
    finally:
        client.close()


def test_grpc_metadata_reaches_the_model(served):
    _, server, flags = served
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        body = {"key1": 7}
        headers = {k.lower(): v for k, v in HEADERS.items()}  # gRPC keys are lower case
        got = _params(client.infer(MODEL, _inputs(grpcclient), parameters=body, headers=headers))
        assert got == _expected(flags, body, FORWARDED)
        other = {"my_header_1": "second"}
        got = _params(client.infer(MODEL, _inputs(grpcclient), parameters=body, headers=other))
        assert got == _expected(flags, body, other)
        got = _params(client.infer(MODEL, _inputs(grpcclient), parameters=body))
        assert got == body
    finally:
        client.close()


def test_grpc_stream_metadata_reaches_every_request(served):
    _, server, flags = served
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    try:
        client.start_stream(
            callback=partial(lambda q, result, error: q.put(error or result), results),
            headers={"my_header_1": "streamed", "header_1": "no"},
        )
        for i in range(2):
            client.async_stream_infer(MODEL, _inputs(grpcclient), parameters={"i": i})
        got = sorted((_params(results.get(timeout=10)) for _ in range(2)), key=lambda p: p["i"])
        forwarded = {"my_header_1": "streamed"}
        assert got == [_expected(flags, {"i": i}, forwarded) for i in range(2)]
    finally:
        client.stop_stream()
        client.close()


def test_reserved_forwarded_header_refused(served):
    """A matched header named as a parameter Triton reserves is refused, as Triton's
    L0_parameters checks; the same server answers a normal inference right after."""
    _, server, flags = served
    if not flags:
        pytest.skip("nothing is forwarded without the flags")
    http = httpclient.InferenceServerClient(server.url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as err:
            http.infer(MODEL, _inputs(httpclient), headers={"sequence_id": "5"})
        assert err.value.status() == "400"
        assert "'sequence_id'" in err.value.message()
        assert "reserved for Triton usage" in err.value.message()
        with pytest.raises(InferenceServerException) as err:
            grpc.infer(MODEL, _inputs(grpcclient), headers={"sequence_id": "5"})
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "reserved for Triton usage" in err.value.message()
        # Still serving, on both protocols
        assert _params(http.infer(MODEL, _inputs(httpclient), headers={"my_header_1": "a"})) == {
            "my_header_1": "a"
        }
        assert _params(grpc.infer(MODEL, _inputs(grpcclient), headers={"my_header_1": "b"})) == {
            "my_header_1": "b"
        }
    finally:
        http.close()
        grpc.close()


@pytest.mark.parametrize("flag", ["--http-header-forward-pattern", "--grpc-header-forward-pattern"])
def test_bad_pattern_stops_the_server(flag, tmp_path):
    """A pattern that is no regular expression stops ``despina serve`` before it listens
    (fail closed), saying which flag and why."""
    proc, _ = serve_refused(tmp_path, f"{flag}=my_header(")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"{flag}: invalid regular expression 'my_header('" in out
    assert "refusing to start" in out


def test_many_matching_headers_get_431(served):
    """Matching header fields count against --http-max-header-count as any others: 150
    of them on an inference are refused before anything is forwarded (lean: 431, aiohttp:
    its own 400); the same server answers a normal inference right after."""
    name, server, flags = served
    fields = "".join(f"my_header_{i}: {'v' * 100}\r\n" for i in range(150))
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(
            f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n{fields}"
            "Content-Length: 2\r\n\r\n{}".encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        while len(reply) - reply.index(b"\r\n\r\n") - 4 < int(
            reply.lower().split(b"content-length: ")[1].split(b"\r\n")[0]
        ):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    if SERVERS[name][0] == "lean":
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:300]
        assert reply.endswith(
            b"at most 100 fields of 65536 bytes in all "
            b'(--http-max-header-count, --http-max-header-size)"}'
        ), reply
    else:  # aiohttp's own refusal, in Triton's JSON body (app.JsonErrorRunner)
        assert reply.startswith(b"HTTP/1.0 400 "), reply[:300]
        assert reply.endswith(b'{"error":"Bad Request: Too many headers received"}'), reply
    client = httpclient.InferenceServerClient(server.url)
    try:
        got = _params(client.infer(MODEL, _inputs(httpclient), headers={"my_header_1": "ok"}))
        assert got == _expected(flags, {}, {"my_header_1": "ok"})
    finally:
        client.close()


def test_pattern_semantics():
    """Triton's reading of the pattern: searched anywhere in the name, case-insensitive
    unless it starts with ``(?-i)``; empty: nothing to forward."""
    option = "--grpc-header-forward-pattern"
    pattern = compile_forward_pattern("MY_HEADER.*", option)
    assert pattern is not None
    assert pattern.search("x-my_header_1") is not None
    pattern = compile_forward_pattern("(?-i)MY_HEADER.*", option)
    assert pattern is not None
    assert pattern.search("my_header_1") is None
    assert pattern.search("MY_HEADER_1") is not None
    assert compile_forward_pattern("", option) is None
    with pytest.raises(ValueError, match="invalid regular expression"):
        compile_forward_pattern("[", option)
