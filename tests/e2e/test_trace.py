"""The trace extension end to end (Triton's ``/v2[/models/m]/trace/setting`` and gRPC
``TraceSetting``): the settings start from ``--trace-config`` (Triton's syntax), change
globally and per model with tritonclient over HTTP and gRPC (sync and aio), a model's
settings fall back to the global ones field by field (and again once cleared with
null), and the trace file holds Triton's JSON for exactly the sampled requests
(``trace_rate`` 2: every other one), each with its timestamps in order."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, DespinaServer, free_port

ORDER = [
    "REQUEST_START",
    "QUEUE_START",
    "COMPUTE_START",
    "COMPUTE_INPUT_END",
    "COMPUTE_OUTPUT_START",
    "COMPUTE_END",
    "REQUEST_END",
]
# As they come in a trace of a request over each protocol: its receipt, then the rest,
# then the send of its answer (stamped by the lean HTTP and h2 gRPC transports).
HTTP_ORDER = ["HTTP_RECV_START", "HTTP_RECV_END", *ORDER, "HTTP_SEND_START", "HTTP_SEND_END"]
GRPC_ORDER = [
    "GRPC_WAITREAD_START",
    "GRPC_WAITREAD_END",
    *ORDER,
    "GRPC_SEND_START",
    "GRPC_SEND_END",
]


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    return tmp_path_factory.mktemp("trace") / "trace.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory, trace_file):
    root = tmp_path_factory.mktemp("repo")
    for model in ("simple", "identity_fp32"):
        shutil.copytree(SHIPPED_REPOSITORY / model, root / model)
    srv = DespinaServer(
        root,
        tmp_path_factory.mktemp("logs") / "serve.log",
        [
            f"--trace-config=triton,file={trace_file}",
            "--trace-config=rate=2",
            "--trace-config=level=OFF",
        ],
    ).start()
    yield srv
    srv.stop()


def _infer_simple(server: DespinaServer, n: int, tag: str, module=httpclient) -> None:
    """``n`` requests to ``simple`` over ``module``'s protocol (tritonclient http or
    grpc), with request ids ``tag-i``, each answer checked."""
    url = server.url if module is httpclient else server.grpc_url
    client = module.InferenceServerClient(url)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [module.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(a)
    for i in range(n):
        result = client.infer("simple", inputs, request_id=f"{tag}-{i}")
        assert result.as_numpy("OUTPUT0").tolist() == (a * 2).tolist()


def _traces(trace_file, model: str, count: int) -> list[dict]:
    """The file's traces of ``model`` once there are ``count`` (or what is there at the
    deadline)."""
    deadline = time.monotonic() + 10
    found: list[dict] = []
    while time.monotonic() < deadline:
        if trace_file.exists():
            found = [t for t in json.loads(trace_file.read_text()) if t.get("model_name") == model]
            if len(found) >= count:
                break
        time.sleep(0.05)
    return found


def test_flags_set_the_global_settings(server, trace_file):
    client = httpclient.InferenceServerClient(server.url)
    assert client.get_trace_settings() == {
        "trace_level": ["OFF"],
        "trace_rate": "2",
        "trace_count": "-1",
        "log_frequency": "0",
        "trace_file": str(trace_file),
        "trace_mode": "triton",
    }
    # A model without settings of its own shows the global ones.
    assert client.get_trace_settings("simple") == client.get_trace_settings()
    _infer_simple(server, 3, "off")
    assert not trace_file.exists()


def test_sampled_requests_are_written_with_timestamps_in_order(server, trace_file):
    client = httpclient.InferenceServerClient(server.url)
    settings = client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    assert settings["trace_level"] == ["TIMESTAMPS"] and settings["trace_rate"] == "2"
    try:
        before = time.time_ns()
        _infer_simple(server, 10, "sampled")
        traces = _traces(trace_file, "simple", 5)
        after = time.time_ns()
    finally:
        client.update_trace_settings(settings={"trace_level": ["OFF"]})
    assert len(traces) == 5  # trace_rate 2: half of the 10 requests
    assert len({t["id"] for t in traces}) == 5
    for trace in traces:
        assert trace["model_version"] == 1
        _check_timestamps(trace, before, after, HTTP_ORDER)


def test_model_setting_overrides_and_falls_back(server, trace_file):
    client = httpclient.InferenceServerClient(server.url)
    own = client.update_trace_settings("simple", {"trace_rate": "1", "trace_level": ["TIMESTAMPS"]})
    assert own["trace_rate"] == "1" and own["trace_level"] == ["TIMESTAMPS"]
    assert own["trace_count"] == "-1"  # not set for the model: the global one
    glob = client.get_trace_settings()
    assert glob["trace_rate"] == "2" and glob["trace_level"] == ["OFF"]
    try:
        had = len(_traces(trace_file, "simple", 0))
        _infer_simple(server, 4, "override")
        traces = _traces(trace_file, "simple", had + 4)
        assert len(traces) == had + 4  # rate 1: every request of this model
        # identity_fp32 follows the global level (OFF): no trace of it
        assert _traces(trace_file, "identity_fp32", 0) == []
        # Clearing the model's rate falls back to the global one (2); its level stays.
        cleared = client.update_trace_settings("simple", {"trace_rate": None})
        assert cleared["trace_rate"] == "2" and cleared["trace_level"] == ["TIMESTAMPS"]
        _infer_simple(server, 4, "fallback")
        traces = _traces(trace_file, "simple", had + 6)
        time.sleep(0.3)
        assert len(_traces(trace_file, "simple", had + 6)) == had + 6
        # trace_count: 1 more trace, then none
        client.update_trace_settings("simple", {"trace_count": "1", "trace_rate": "1"})
        _infer_simple(server, 3, "counted")
        time.sleep(0.3)
        assert len(_traces(trace_file, "simple", had + 7)) == had + 7
    finally:
        back = client.update_trace_settings(
            "simple", {"trace_rate": None, "trace_level": None, "trace_count": None}
        )
    assert back == client.get_trace_settings()


def test_refusals_as_triton(server):
    client = httpclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException) as err:
        client.update_trace_settings(settings={"trace_file": "/tmp/elsewhere.json"})
    assert "trace file location can not be updated through network protocol" in str(err.value)
    for bad in (
        {"trace_rate": "0"},
        {"trace_rate": "often"},
        {"trace_count": "-2"},
        {"log_frequency": "-1"},
        {"trace_level": ["EVERYTHING"]},
        {"trace_colour": "blue"},
    ):
        with pytest.raises(InferenceServerException) as err:
            client.update_trace_settings(settings=bad)
        assert next(iter(bad)) in str(err.value)


def test_grpc_sync_and_aio(server, trace_file):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    got = client.get_trace_settings(as_json=True)["settings"]
    assert got["trace_rate"] == {"value": ["2"]}
    assert got["trace_file"] == {"value": [str(trace_file)]}
    changed = client.update_trace_settings("identity_fp32", {"log_frequency": "3"}, as_json=True)[
        "settings"
    ]
    assert changed["log_frequency"] == {"value": ["3"]}
    assert changed["trace_rate"] == {"value": ["2"]}  # the global one

    async def aio() -> dict:
        async with grpcaio.InferenceServerClient(server.grpc_url) as grpc_aio:
            # None clears the field: the model falls back to the global one again
            return await grpc_aio.update_trace_settings(
                "identity_fp32", {"log_frequency": None}, as_json=True
            )

    back = asyncio.run(aio())["settings"]
    assert back["log_frequency"] == {"value": ["0"]}


def _infer_grpc(server: DespinaServer, n: int, tag: str) -> None:
    _infer_simple(server, n, tag, grpcclient)


def _check_timestamps(trace: dict, before: int, after: int, order: list[str]) -> None:
    """Every timestamp, the protocol's receipt, frontend, queue, backend host, reply and
    the protocol's send, once, in ``order``, and within the client's call."""
    names = [s["name"] for s in trace["timestamps"]]
    assert names == order
    stamps = [s["ns"] for s in trace["timestamps"]]
    assert stamps == sorted(stamps)
    assert before <= stamps[0] and stamps[-1] <= after


def test_grpc_requests_are_traced_on_the_direct_route(server, trace_file):
    client = httpclient.InferenceServerClient(server.url)
    client.update_trace_settings("simple", {"trace_rate": "1", "trace_level": ["TIMESTAMPS"]})
    try:
        had = len(_traces(trace_file, "simple", 0))
        before = time.time_ns()
        _infer_grpc(server, 3, "grpc-direct")
        after = time.time_ns()
        traces = _traces(trace_file, "simple", had + 3)[had:]
    finally:
        client.update_trace_settings("simple", {"trace_rate": None, "trace_level": None})
    assert [t["request_id"] for t in traces] == ["grpc-direct-0", "grpc-direct-1", "grpc-direct-2"]
    for trace in traces:
        _check_timestamps(trace, before, after, GRPC_ORDER)


def test_a_large_answer_is_traced_to_the_end_of_its_send(server, trace_file):
    """A 4 MiB answer leaves from shared memory in a task (not joined): its
    HTTP_SEND_END comes once the last part was written."""
    client = httpclient.InferenceServerClient(server.url)
    client.update_trace_settings(
        "identity_fp32", {"trace_rate": "1", "trace_level": ["TIMESTAMPS"]}
    )
    data = np.arange(1 << 20, dtype=np.float32).reshape(1, -1)
    try:
        tensor = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        before = time.time_ns()
        wanted = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)]
        result = client.infer("identity_fp32", [tensor], outputs=wanted, request_id="large")
        after = time.time_ns()
        traces = _traces(trace_file, "identity_fp32", 1)
    finally:
        client.update_trace_settings("identity_fp32", {"trace_rate": None, "trace_level": None})
    assert np.array_equal(result.as_numpy("OUTPUT0"), data)
    assert [t["request_id"] for t in traces] == ["large"]
    _check_timestamps(traces[0], before, after, HTTP_ORDER)


def test_stream_requests_are_traced_from_their_read_to_their_write(server, trace_file):
    """ModelStreamInfer: each request's trace runs from the wait for its message
    (GRPC_WAITREAD_*) to the write of its response (GRPC_SEND_*)."""
    client = httpclient.InferenceServerClient(server.url)
    client.update_trace_settings("simple", {"trace_rate": "1", "trace_level": ["TIMESTAMPS"]})
    results: list = []
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [grpcclient.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(a)
    stream = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        had = len(_traces(trace_file, "simple", 0))
        before = time.time_ns()
        stream.start_stream(callback=lambda result, error: results.append((result, error)))
        for i in range(2):
            stream.async_stream_infer("simple", inputs, request_id=f"stream-{i}")
        deadline = time.monotonic() + 10
        while len(results) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        stream.stop_stream()
        after = time.time_ns()
        traces = _traces(trace_file, "simple", had + 2)[had:]
    finally:
        stream.close()
        client.update_trace_settings("simple", {"trace_rate": None, "trace_level": None})
    assert [e for _, e in results] == [None, None]
    assert sorted(t["request_id"] for t in traces) == ["stream-0", "stream-1"]
    for trace in traces:
        _check_timestamps(trace, before, after, GRPC_ORDER)


def test_a_decoupled_requests_trace_ends_with_its_last_write(tmp_path):
    """A decoupled model's request on a stream: its trace is filed once its call ends,
    with GRPC_SEND_* when its last answer is written (the empty final, asked for with
    triton_enable_empty_final_response), without them when nothing is written for the
    FINAL flag alone."""
    from test_decoupled import CONFIG, REPEAT_PY

    model = tmp_path / "repo" / "repeat"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(CONFIG.format(name="repeat"))
    (model / "1" / "model.py").write_text(REPEAT_PY)
    srv, trace_file = _every_request_traced(tmp_path)
    results: list = []
    stream = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        tensor = grpcclient.InferInput("IN", [2], "INT32")
        tensor.set_data_from_numpy(np.array([4, 5], dtype=np.int32))
        stream.start_stream(callback=lambda result, error: results.append((result, error)))
        stream.async_stream_infer("repeat", [tensor], request_id="quiet")
        stream.async_stream_infer(
            "repeat", [tensor], request_id="told", enable_empty_final_response=True
        )
        deadline = time.monotonic() + 10
        while len(results) < 5 and time.monotonic() < deadline:  # 2 + 2 and told's final
            time.sleep(0.01)
        stream.stop_stream()
        traces = {t["request_id"]: t for t in _traces(trace_file, "repeat", 2)}
    finally:
        stream.close()
        srv.stop()
    assert [e for _, e in results] == [None] * 5
    for request_id, last in (("quiet", "REQUEST_END"), ("told", "GRPC_SEND_END")):
        names = [s["name"] for s in traces[request_id]["timestamps"]]
        stamps = [s["ns"] for s in traces[request_id]["timestamps"]]
        assert names[:3] == ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END", "REQUEST_START"]
        assert names[-1] == last and stamps == sorted(stamps), names
        assert ("GRPC_SEND_START" in names) == (request_id == "told")


def test_tensors_level_writes_inputs_and_outputs(server, trace_file):
    client = httpclient.InferenceServerClient(server.url)
    client.update_trace_settings(
        "simple", {"trace_rate": "1", "trace_level": ["TIMESTAMPS", "TENSORS"]}
    )
    try:
        had = len(_traces(trace_file, "simple", 0))
        _infer_simple(server, 1, "tensors")
        trace = _traces(trace_file, "simple", had + 1)[had]
    finally:
        client.update_trace_settings("simple", {"trace_rate": None, "trace_level": None})
    assert trace["request_id"] == "tensors-0"
    assert [s["name"] for s in trace["timestamps"]] == HTTP_ORDER
    records = json.loads(trace_file.read_text())
    tensors = {
        (r["activity"], r["tensor"]["name"]): r["tensor"]
        for r in records
        if r.get("id") == trace["id"] and "activity" in r
    }
    values = ",".join(str(v) for v in range(16))
    assert tensors == {
        ("TENSOR_QUEUE_INPUT", "INPUT0"): {
            "name": "INPUT0",
            "data": values,
            "shape": "1,16",
            "dtype": "INT32",
        },
        ("TENSOR_QUEUE_INPUT", "INPUT1"): {
            "name": "INPUT1",
            "data": values,
            "shape": "1,16",
            "dtype": "INT32",
        },
        ("TENSOR_BACKEND_OUTPUT", "OUTPUT0"): {
            "name": "OUTPUT0",
            "data": ",".join(str(2 * v) for v in range(16)),
            "shape": "1,16",
            "dtype": "INT32",
        },
        ("TENSOR_BACKEND_OUTPUT", "OUTPUT1"): {
            "name": "OUTPUT1",
            "data": ",".join("0" for _ in range(16)),
            "shape": "1,16",
            "dtype": "INT32",
        },
    }


def test_trace_mode_is_not_changed_over_the_network(server):
    client = httpclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException) as err:
        client.update_trace_settings(settings={"trace_mode": "opentelemetry"})
    assert "trace mode can not be updated through network protocol" in str(err.value)
    assert client.get_trace_settings()["trace_mode"] == "triton"


def _every_request_traced(
    tmp_path, flags: list[str] | None = None, env: dict[str, str] | None = None
) -> tuple[DespinaServer, object]:
    """A server on ``tmp_path/repo`` tracing every request (``flags`` and ``env`` added),
    started, and its trace file."""
    trace_file = tmp_path / "trace.json"
    srv = DespinaServer(
        tmp_path / "repo",
        tmp_path / "serve.log",
        [
            *(flags or []),
            f"--trace-config=triton,file={trace_file}",
            "--trace-config=rate=1",
            "--trace-config=level=TIMESTAMPS",
        ],
        env=env,
    ).start()
    return srv, trace_file


def _traced_server_run(
    tmp_path, tags: tuple[str, str], flags: list[str], env: dict[str, str] | None = None
) -> tuple[list[dict], int, int]:
    """A server with every request traced (``flags`` and ``env`` added), two requests
    over HTTP and two over gRPC (request ids ``tags[0]-i``, ``tags[1]-i``): their traces
    in order, and the wall clock before and after."""
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "simple").symlink_to(SHIPPED_REPOSITORY / "simple")
    srv, trace_file = _every_request_traced(tmp_path, flags, env)
    try:
        before = time.time_ns()
        _infer_simple(srv, 2, tags[0])
        _infer_grpc(srv, 2, tags[1])
        traces = _traces(trace_file, "simple", 4)
        after = time.time_ns()
    finally:
        srv.stop()
    assert [t["request_id"] for t in traces] == [f"{tag}-{i}" for tag in tags for i in (0, 1)]
    return traces, before, after


def test_scheduled_route_http_and_grpc(tmp_path):
    """Every request through the scheduler (--direct-routes=false): its QUEUE_START is
    the scheduler's, its COMPUTE_* the backend host's, over HTTP and gRPC."""
    traces, before, after = _traced_server_run(
        tmp_path, ("http-scheduled", "grpc-scheduled"), ["--direct-routes=false"]
    )
    for trace, order in zip(traces, [HTTP_ORDER, HTTP_ORDER, GRPC_ORDER, GRPC_ORDER]):
        assert trace["model_version"] == 1
        _check_timestamps(trace, before, after, order)


def test_fallback_transports_trace_without_protocol_stamps(tmp_path):
    """aiohttp (HTTP) and grpcio (gRPC) do not stamp a request's receipt and send: their
    traces have every other timestamp, in order, and are written all the same."""
    traces, before, after = _traced_server_run(
        tmp_path,
        ("aiohttp", "grpcio"),
        [],
        {"DESPINA_HTTP_TRANSPORT": "aiohttp", "DESPINA_GRPC_TRANSPORT": "grpcio"},
    )
    for trace in traces:
        _check_timestamps(trace, before, after, ORDER)


class _Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps each POST /v1/traces body, answers 200."""

    bodies: list[bytes]

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path == "/v1/traces":
            self.server.bodies.append(body)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def otlp_receiver():
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    httpd.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _spans(receiver, count: int) -> list:
    """The spans received, once there are ``count`` (or what came by the deadline)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    deadline = time.monotonic() + 15
    spans: list = []
    while time.monotonic() < deadline:
        spans = []
        for body in list(receiver.bodies):
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    spans.extend(scope_spans.spans)
        if len(spans) >= count:
            break
        time.sleep(0.05)
    return spans


def test_opentelemetry_export(tmp_path, otlp_receiver):
    pytest.importorskip("opentelemetry.sdk")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "simple").symlink_to(SHIPPED_REPOSITORY / "simple")
    port = otlp_receiver.server_address[1]
    srv = DespinaServer(
        tmp_path / "repo",
        tmp_path / "serve.log",
        [
            "--trace-config=mode=opentelemetry",
            f"--trace-config=opentelemetry,url=http://127.0.0.1:{port}/v1/traces",
            # No export before exit: the spans arrive because the frontend flushes them
            # as it stops.
            "--trace-config=opentelemetry,bsp_schedule_delay=600000",
            "--trace-config=opentelemetry,resource=service.name=despina-test",
            "--trace-config=rate=1",
            "--trace-config=level=TIMESTAMPS",
        ],
    ).start()
    try:
        assert httpclient.InferenceServerClient(srv.url).get_trace_settings()["trace_mode"] == (
            "opentelemetry"
        )
        before = time.time_ns()
        _infer_simple(srv, 1, "otel")
        after = time.time_ns()
        time.sleep(0.3)
        assert otlp_receiver.bodies == []
    finally:
        srv.stop()
    spans = _spans(otlp_receiver, 3)
    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == ["InferRequest", "compute", "simple"]
    root, model, compute = by_name["InferRequest"], by_name["simple"], by_name["compute"]
    assert len({s.trace_id for s in spans}) == 1
    assert model.parent_span_id == root.span_id and compute.parent_span_id == model.span_id
    attributes = {a.key: a.value for a in model.attributes}
    assert attributes["triton.model_name"].string_value == "simple"
    assert attributes["triton.model_version"].int_value == 1
    assert attributes["triton.request_id"].string_value == "otel-0"
    assert attributes["triton.trace_id"].int_value >= 1
    assert [e.name for e in model.events] == ["REQUEST_START", "QUEUE_START", "REQUEST_END"]
    assert [e.name for e in compute.events] == [
        "COMPUTE_START",
        "COMPUTE_INPUT_END",
        "COMPUTE_OUTPUT_START",
        "COMPUTE_END",
    ]
    assert [e.name for e in root.events] == [
        "HTTP_RECV_START",
        "HTTP_RECV_END",
        "HTTP_SEND_START",
        "HTTP_SEND_END",
    ]
    outer = [e.time_unix_nano for e in root.events]
    stamps = [e.time_unix_nano for e in model.events]
    inner = [e.time_unix_nano for e in compute.events]
    assert outer == sorted(outer) and stamps == sorted(stamps) and inner == sorted(inner)
    assert before <= root.start_time_unix_nano == outer[0] and outer[1] <= stamps[0]
    assert model.start_time_unix_nano == stamps[0] and model.end_time_unix_nano == stamps[2]
    assert stamps[1] <= inner[0] and inner[-1] <= stamps[2] <= outer[2]
    assert outer[3] == root.end_time_unix_nano <= after
    assert compute.start_time_unix_nano == inner[0] and compute.end_time_unix_nano == inner[-1]


def test_opentelemetry_mode_refused_without_its_packages(tmp_path):
    """Without opentelemetry-sdk (a package shadowing it that fails to import), the
    mode refuses to start, naming what to install."""
    shadow = tmp_path / "shadow" / "opentelemetry"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed here')\n")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "simple").symlink_to(SHIPPED_REPOSITORY / "simple")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "despina.services.cli",
            "serve",
            f"--model-repository={tmp_path / 'repo'}",
            f"--http-port={free_port()}",
            f"--grpc-port={free_port()}",
            "--trace-config=mode=opentelemetry",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "shadow")},
    )
    assert done.returncode != 0
    out = done.stderr + done.stdout
    assert "OpenTelemetry trace export needs the Python package(s) opentelemetry-sdk" in out
    assert "despina[otel]" in out
