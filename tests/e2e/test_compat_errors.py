"""Issue #14: Triton's status codes and words where Triton's own qa tests check them
(``qa/L0_http/http_test.py``, ``qa/L0_shared_memory/shared_memory_test.py``,
``qa/L0_grpc/python_unit_test.py``, ``qa/L0_http/python_http_aio_test.py``), over both
HTTP transports and both gRPC transports: one server serves lean HTTP and Despina's own
HTTP/2 gRPC, the other aiohttp and grpc.aio. Each refusal is followed, on the same
server, by a normal inference checked value by value."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from conftest import (
    SHIPPED_REPOSITORY,
    DespinaServer,
    assert_serves_simple,
    read_http_response,
    serve_refused,
)

UINT64_MAX_MINUS_31 = 2**64 - 32  # Triton's test: -32 once read as a signed offset


def _write_models(root, generator) -> None:
    """The shipped ``simple`` and ``identity_fp32``; the qa tests' raw-binary models
    (a BYTES input of dims [1], one of dims [-1], an FP32 input with two variable
    dimensions); and an ONNX model whose file is garbage (never ready)."""
    import shutil

    for model in ("simple", "identity_fp32"):
        shutil.copytree(SHIPPED_REPOSITORY / model, root / model)
    spec = generator.TensorSpec
    for name, data_type, dims in (
        ("bytes_one", "TYPE_STRING", (1,)),
        ("bytes_many", "TYPE_STRING", (-1,)),
        ("two_variable", "TYPE_FP32", (-1, -1)),
    ):
        inputs = [spec("INPUT0", data_type, dims)]
        outputs = [spec("OUTPUT0", data_type, dims)]
        model_dir = root / name
        (model_dir / "1").mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(
            generator.format_config(
                name,
                platform="onnxruntime_onnx",
                max_batch_size=0,
                inputs=inputs,
                outputs=outputs,
            )
        )
        node = generator.helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])
        generator._write_onnx(model_dir, name, [node], inputs, outputs, batched=False)
    generator.broken(root)


@pytest.fixture(scope="module", params=[("lean", "auto"), ("aiohttp", "grpcio")], ids=str)
def server(request, tmp_path_factory, generator):
    http_transport, grpc_transport = request.param
    root = tmp_path_factory.mktemp("compat-errors-repo")
    _write_models(root, generator)
    log = tmp_path_factory.mktemp("compat-errors-logs") / "serve.log"
    env = {"DESPINA_HTTP_TRANSPORT": http_transport, "DESPINA_GRPC_TRANSPORT": grpc_transport}
    srv = DespinaServer(root, log, ["--allow-client-shm=true"], env=env).start()
    yield srv
    assert srv.stop() == 0


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def get(server, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def error_of(status_body: tuple) -> tuple[int, str]:
    """(status, the ``error`` of Triton's JSON body): fails on any other body."""
    status, *_, body = status_body
    return status, json.loads(body)["error"]


def infer_json(server, doc: dict) -> tuple[int, str]:
    return error_of(post(server, "/v2/models/identity_fp32/infer", json.dumps(doc).encode()))


def still_serves(server) -> None:
    assert_serves_simple(server.url)


def one_input(shape: list, data: object) -> dict:
    return {"inputs": [{"name": "INPUT0", "shape": shape, "datatype": "FP32", "data": data}]}


# -- qa/L0_http/http_test.py ----------------------------------------------------------


def test_shape_overflows_get_tritons_words(server):
    status, error = infer_json(server, one_input([2**4, 2**60 + 2], [1.0]))
    assert status == 400
    assert "causes total element count to exceed maximum size of" in error
    assert "'INPUT0'" in error
    status, error = infer_json(server, one_input([2**2, 2**60 + 2], [1.0]))
    assert status == 400
    assert "byte size overflow for input" in error
    still_serves(server)


def test_negative_dimension_gets_tritons_500(server):
    status, error = infer_json(server, one_input([2, -5], [1.0]))
    assert status == 500
    assert (
        "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as unsigned-integer"
        in error
    )
    assert "[2,-5]" in error  # and Despina says which shape
    still_serves(server)


def test_json_nesting_deeper_than_100_is_refused(server):
    def nested(depth: int) -> object:
        value: object = 1.0
        for _ in range(depth):
            value = [value]
        return value

    status, error = infer_json(server, one_input([1, 1], nested(120)))
    assert (status, error) == (400, "JSON nesting depth exceeds maximum allowed limit (100)")
    status, _, body = post(
        server, "/v2/models/identity_fp32/infer", json.dumps(one_input([1, 1], nested(50))).encode()
    )
    assert status == 200, body
    assert json.loads(body)["outputs"][0]["data"] == [1.0]
    # Past orjson's own depth limit too: the same answer, not a parser's message.
    deep = b'{"inputs": [{"name": "INPUT0", "data": ' + b"[" * 2000 + b"]" * 2000 + b"}]}"
    status, error = error_of(post(server, "/v2/models/identity_fp32/infer", deep))
    assert (status, error) == (400, "JSON nesting depth exceeds maximum allowed limit (100)")
    still_serves(server)


def test_duplicate_output_names_are_refused_on_http_and_grpc(server):
    doc = one_input([1, 8], [list(map(float, range(8)))])
    doc["outputs"] = [{"name": "OUTPUT0"}, {"name": "OUTPUT0"}]
    status, error = infer_json(server, doc)
    assert (status, error) == (400, "Duplicate output name 'OUTPUT0' is not allowed in a request")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("INPUT0", [1, 8], "FP32")
    inp.set_data_from_numpy(np.ones((1, 8), np.float32))
    outs = [grpcclient.InferRequestedOutput("OUTPUT0") for _ in range(2)]
    with pytest.raises(InferenceServerException) as info:
        client.infer("identity_fp32", [inp], outputs=outs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message() == "Duplicate output name 'OUTPUT0' is not allowed in a request"
    client.close()
    assert get(server, "/v2/health/live")[0] == 200
    still_serves(server)


def _raw(server, model: str, body: bytes) -> tuple[int, dict, bytes]:
    return post(server, f"/v2/models/{model}/infer", body, {"Inference-Header-Content-Length": "0"})


def test_raw_binary_bytes_input_of_one_element(server):
    status, headers, body = _raw(server, "bytes_one", b"427")
    assert status == 200, body
    length = int(headers["Inference-Header-Content-Length"])
    # Triton's BYTES output: each element behind its 4-byte length.
    assert body[length:] == (3).to_bytes(4, "little") + b"427"


def test_raw_binary_refusals_with_tritons_words(server):
    status, error = error_of(_raw(server, "bytes_many", b"427"))
    assert status == 400
    assert "For BYTE datatype raw input 'INPUT0', the model must have input shape [1]" in error
    status, error = error_of(_raw(server, "two_variable", np.ones(4, np.float32).tobytes()))
    assert status == 400
    assert (
        "The shape of the raw input 'INPUT0' can not be deduced because there are more than "
        "one variable-sized dimension" in error
    )
    still_serves(server)


# -- model repository, unsupported extensions, a model that is not ready --------------

CONTROL = "explicit model load / unload is not allowed if polling is enabled"


def test_load_and_unload_in_mode_none_answer_tritons_error(server):
    for verb in ("load", "unload"):
        status, error = error_of(post(server, f"/v2/repository/models/simple/{verb}", b"{}"))
        assert status == 501 and error.startswith(CONTROL)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as info:
            call("simple")
        assert info.value.status() == "StatusCode.UNIMPLEMENTED"
        assert info.value.message().startswith(CONTROL)
    client.close()

    async def aio() -> None:
        aclient = httpaio.InferenceServerClient(server.url)
        try:
            for call in (aclient.load_model, aclient.unload_model):
                with pytest.raises(InferenceServerException, match=CONTROL):
                    await call("simple")
            # The aio qa test's other calls that must succeed on a server without regions.
            assert await aclient.get_system_shared_memory_status() == []
            await aclient.unregister_system_shared_memory()
            assert await aclient.get_cuda_shared_memory_status() == []
            await aclient.unregister_cuda_shared_memory()
            with pytest.raises(InferenceServerException):
                await aclient.register_cuda_shared_memory("", b"", 0, 0)
        finally:
            await aclient.close()

    asyncio.run(aio())
    still_serves(server)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "expected"),
    [
        ("GET", "/v2/trace/setting", None, 200, "trace_level"),
        ("POST", "/v2/trace/setting", b"{}", 200, "trace_rate"),
        ("POST", "/v2/models/simple/trace/setting", b"{}", 200, "trace_mode"),
        ("POST", "/v2/trace/setting", b"{not json", 400, "failed to parse"),
        ("POST", "/v2/trace/setting", b'{"trace_rate": "x"}', 400, "trace_rate"),
        ("GET", "/v2/logging", None, 200, "log_verbose_level"),
        ("POST", "/v2/logging", b"{}", 200, "log_format"),
        ("POST", "/v2/logging", b"[1]", 400, "JSON object"),
        ("POST", "/v2/logging", b'{"log_file": "x"}', 501, "can not be updated"),
    ],
)
def test_trace_and_logging_routes_answer_in_json(server, method, path, body, status, expected):
    """Triton's routes of the trace and logging extensions: the settings as a JSON
    object, or the error as the JSON body tritonclient reads (a file location is
    refused with Triton's words and UNSUPPORTED status)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    conn.request(method, path, body=body)
    response = conn.getresponse()
    got, doc = response.status, json.loads(response.read())
    conn.close()
    assert got == status
    if status == 200:
        assert expected in doc
    else:
        assert expected in doc["error"]


def test_extension_errors_reach_tritonclient(server):
    client = httpclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException, match="trace file location can not be"):
        client.update_trace_settings(settings={"trace_file": "/tmp/t.json"})
    client.close()


def test_a_model_that_is_not_ready_answers_503_and_unavailable(server):
    status, error = error_of(
        post(server, "/v2/models/broken_onnx/infer", json.dumps(one_input([1, 1], [1.0])).encode())
    )
    assert status == 503 and "broken_onnx" in error
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_model_ready("broken_onnx") is False
    inp = grpcclient.InferInput("INPUT0", [1, 1], "FP32")
    inp.set_data_from_numpy(np.ones((1, 1), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("broken_onnx", [inp])
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "broken_onnx" in info.value.message()
    client.close()
    still_serves(server)


# -- qa/L0_shared_memory/shared_memory_test.py -----------------------------------------


@pytest.fixture()
def region():
    """A 64-byte client region, destroyed after the test."""
    key = f"/compat_{os.getpid()}"
    handle = shm.create_shared_memory_region("compat", key, 64)
    yield key, handle
    shm.destroy_shared_memory_region(handle)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_registration_past_the_object_is_invalid_args(server, region, protocol):
    key, _ = region
    client = (
        httpclient.InferenceServerClient(server.url)
        if protocol == "http"
        else grpcclient.InferenceServerClient(server.grpc_url)
    )
    try:
        for byte_size, offset in ((65, 0), (64, 1), (1, 64), (0, 0)):
            with pytest.raises(
                InferenceServerException,
                match="failed to register shared memory region 'r' *: invalid args",
            ):
                client.register_system_shared_memory("r", key, byte_size, offset=offset)
        client.register_system_shared_memory("r", key, 64)
        with pytest.raises(InferenceServerException, match="'r' already in manager"):
            client.register_system_shared_memory("r", key, 64)
        status = client.get_system_shared_memory_status()
        assert len(status if protocol == "http" else status.regions) == 1
    finally:
        client.unregister_system_shared_memory()
        client.close()
    still_serves(server)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_output_offset_out_of_bounds_is_tritons_invalid_offset(server, region, protocol):
    key, _ = region
    module = httpclient if protocol == "http" else grpcclient
    url = server.url if protocol == "http" else server.grpc_url
    client = module.InferenceServerClient(url)
    try:
        client.register_system_shared_memory("out", key, 64)
        inputs = [module.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        for inp in inputs:
            inp.set_data_from_numpy(np.ones((1, 16), np.int32))
        output = module.InferRequestedOutput("OUTPUT0")
        # Over HTTP the qa test sends 2**64 - 32; gRPC's field is signed, so one past.
        output.set_shared_memory(
            "out", 64, offset=UINT64_MAX_MINUS_31 if protocol == "http" else 64
        )
        with pytest.raises(
            InferenceServerException, match="Invalid offset for shared memory region"
        ):
            client.infer("simple", inputs, outputs=[output])
    finally:
        client.unregister_system_shared_memory()
        client.close()
    still_serves(server)


# -- malformed HTTP, flags ---------------------------------------------------------------


def test_malformed_http_gets_a_json_400_on_both_transports(server):
    for request in (
        b"GARBAGE\r\n\r\n",
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
            sock.sendall(request)
            status, headers, body = read_http_response(sock)
        assert status == 400
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body)["error"].startswith("Bad Request")
    still_serves(server)


def test_tritonserver_flags_accepted_and_one_refused_with_its_reason(tmp_path):
    """Triton start scripts pass these: the harmless ones start the server (with a
    warning each), ``--model-config-name`` stops it and says why."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "simple").symlink_to(SHIPPED_REPOSITORY / "simple")
    accepted = [
        "--reuse-http-port=true",
        "--reuse-grpc-port=true",
        "--grpc-infer-thread-count=4",
        "--grpc-max-connection-age=60000",
        "--grpc-max-connection-age-grace=1000",
        "--model-load-gpu-limit=0:0.5",
        "--sagemaker-port=8080",
        "--vertex-ai-port=8081",
    ]
    srv = DespinaServer(repo, tmp_path / "serve.log", accepted).start()
    try:
        still_serves(srv)
        log = srv.log()
        for flag in accepted:
            assert f"{flag.split('=')[0]} is accepted for compatibility" in log, flag
    finally:
        assert srv.stop() == 0
    done, _ = serve_refused(repo, "--model-config-name=h100_config")
    assert done.returncode != 0
    assert "--model-config-name" in done.stderr + done.stdout
    assert "refusing to start" in done.stderr + done.stdout
