"""The statistics extension (HTTP and gRPC, sync and aio tritonclient), counted across two
frontends and two backend hosts (ONNX Runtime and Python), on direct routes and through
the scheduler: the counts match the requests sent exactly (a query counts every request
answered before it; polled with a deadline where a test does not check that), failures
are counted with their reason, a dynamically batched model's batch sizes add up, and an
unknown model gets an error."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import signal
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, DespinaServer

# Python, dynamically batched with a long queue delay: concurrent requests share a batch.
BATCHED_PY = textwrap.dedent(
    """
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            return [
                pb_utils.InferenceResponse([pb_utils.Tensor(
                    "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() * 2
                )])
                for r in requests
            ]
    """
)
BATCHED_CONFIG = """
name: "batched_py"
backend: "python"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 500000 }
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""

DEADLINE_S = 10.0


def stats_repository(root: Path, generator) -> Path:
    shutil.copytree(SHIPPED_REPOSITORY / "simple", root / "simple")
    generator.python_error(root)
    (root / "batched_py" / "1").mkdir(parents=True)
    (root / "batched_py" / "config.pbtxt").write_text(BATCHED_CONFIG)
    (root / "batched_py" / "1" / "model.py").write_text(BATCHED_PY)
    return root


@pytest.fixture(
    scope="session", params=[[], ["--direct-routes=false"]], ids=["direct", "scheduled"]
)
def stats_server(request, tmp_path_factory, generator):
    """Two frontends, an ONNX Runtime host and the Python models' processes; the metrics
    port free. Shared by test_metrics.py."""
    root = stats_repository(tmp_path_factory.mktemp("stats_repo"), generator)
    srv = DespinaServer(
        root,
        tmp_path_factory.mktemp("logs") / "serve.log",
        ["--frontends", "2", "--allow-metrics=true", *request.param],
    ).start()
    yield srv
    srv.stop()


def simple_inputs(module, n: int = 1):
    a = np.arange(16 * n, dtype=np.int32).reshape(n, 16)
    inputs = [
        module.InferInput("INPUT0", [n, 16], "INT32"),
        module.InferInput("INPUT1", [n, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(a)
    return inputs


def error_inputs(module, value: float):
    inp = module.InferInput("INPUT0", [3], "FP32")
    inp.set_data_from_numpy(np.full(3, value, np.float32))
    return [inp]


def model_stats(srv: DespinaServer, model: str) -> dict:
    client = httpclient.InferenceServerClient(srv.url)
    try:
        (entry,) = client.get_inference_statistics(model)["model_stats"]
    finally:
        client.close()
    return entry


def wait_for(srv: DespinaServer, model: str, check) -> dict:
    """The model's statistics once ``check`` holds for them (each process reports within
    100 ms), or the last ones seen after the deadline (the caller's asserts then fail)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        entry = model_stats(srv, model)
        if check(entry) or time.monotonic() > deadline:
            return entry
        time.sleep(0.05)


def counts(entry: dict) -> tuple[int, int]:
    stats = entry["inference_stats"]
    return int(stats["success"].get("count", 0)), int(stats["fail"].get("count", 0))


def test_counts_match_requests_across_protocols(stats_server):
    """Requests to 'simple' over HTTP and gRPC, sync and aio, through both frontends
    (each client connection lands on one of them): every one counted once."""
    before = counts(model_stats(stats_server, "simple"))[0]
    sent = 0
    for _ in range(4):  # new connections: SO_REUSEPORT spreads them over both frontends
        http = httpclient.InferenceServerClient(stats_server.url)
        grpc = grpcclient.InferenceServerClient(stats_server.grpc_url)
        for _ in range(3):
            http.infer("simple", simple_inputs(httpclient))
            grpc.infer("simple", simple_inputs(grpcclient))
            sent += 2
        http.close()
        grpc.close()

    async def aio() -> int:
        http = httpaio.InferenceServerClient(stats_server.url)
        grpc = grpcaio.InferenceServerClient(stats_server.grpc_url)
        try:
            await asyncio.gather(
                *(http.infer("simple", simple_inputs(httpaio)) for _ in range(5)),
                *(grpc.infer("simple", simple_inputs(grpcaio)) for _ in range(5)),
            )
        finally:
            await http.close()
            await grpc.close()
        return 10

    sent += asyncio.run(aio())
    entry = wait_for(stats_server, "simple", lambda e: counts(e)[0] >= before + sent)
    success, fail = counts(entry)
    assert success == before + sent
    assert fail == 0
    stats = entry["inference_stats"]
    assert int(stats["success"]["ns"]) > 0
    # Every executed request has its queue and compute stages counted, once.
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert int(stats[stage]["count"]) == success, stage
    assert int(stats["compute_infer"]["ns"]) > 0
    # One-row requests: inferences = requests; executions batch some of them at most.
    assert int(entry["inference_count"]) == success
    executions = int(entry["execution_count"])
    assert 0 < executions <= success
    batches = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in entry["batch_stats"]}
    assert sum(size * n for size, n in batches.items()) == success
    assert sum(batches.values()) == executions
    assert int(entry["last_inference"]) > (time.time() - 60) * 1000


def test_a_query_right_after_a_request_counts_it(stats_server):
    """As in Triton, a statistics query counts every request answered before it was
    sent, without waiting for the processes' own reports: the scheduler has every
    frontend and backend host flush first (StatsFlush). Requests over gRPC, queries over
    HTTP, new connections each time (so both frontends answer and ask)."""
    for _ in range(6):
        http = httpclient.InferenceServerClient(stats_server.url)
        grpc = grpcclient.InferenceServerClient(stats_server.grpc_url)
        try:
            (before,) = http.get_inference_statistics("simple")["model_stats"]
            grpc.infer("simple", simple_inputs(grpcclient))
            (after,) = http.get_inference_statistics("simple")["model_stats"]
        finally:
            http.close()
            grpc.close()
        assert counts(after)[0] == counts(before)[0] + 1
        for stage in ("queue", "compute_infer", "compute_output"):
            assert int(after["inference_stats"][stage]["count"]) == (
                int(before["inference_stats"][stage]["count"]) + 1
            ), stage
        assert int(after["inference_count"]) == int(before["inference_count"]) + 1


def test_a_reporter_that_cannot_answer_does_not_hold_a_query(stats_server):
    """A backend host stopped (SIGSTOP: alive, its stream open, answering nothing) while
    a statistics query waits for its flush: the query is answered after the scheduler's
    short wait (services/scheduler/stats.FLUSH_WAIT_S) with what the others sent."""
    (onnx,) = stats_server.child_pids("--framework onnxruntime")
    http = httpclient.InferenceServerClient(stats_server.url)
    os.kill(onnx, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        (entry,) = http.get_inference_statistics("simple")["model_stats"]
        waited = time.monotonic() - t0
    finally:
        os.kill(onnx, signal.SIGCONT)
    try:
        assert entry["name"] == "simple" and waited < 2.0, waited
        http.infer("simple", simple_inputs(httpclient))  # the host serves on
    finally:
        http.close()


def test_failures_counted_with_their_model(stats_server):
    before_success, before_fail = counts(model_stats(stats_server, "python_error"))
    http = httpclient.InferenceServerClient(stats_server.url)
    grpc = grpcclient.InferenceServerClient(stats_server.grpc_url)
    for client, module in ((http, httpclient), (grpc, grpcclient)):
        for _ in range(3):
            with pytest.raises(InferenceServerException, match="negative"):
                client.infer("python_error", error_inputs(module, -1.0))
        client.infer("python_error", error_inputs(module, 1.0))
    http.close()
    grpc.close()
    entry = wait_for(
        stats_server,
        "python_error",
        lambda e: counts(e) == (before_success + 2, before_fail + 6),
    )
    assert counts(entry) == (before_success + 2, before_fail + 6)
    assert int(entry["inference_stats"]["fail"]["ns"]) > 0


def test_dynamic_batching_batch_sizes(stats_server):
    """Eight concurrent one-row requests to a model batched with a 500 ms queue delay:
    they run in few executions, and the batch sizes add up to eight."""
    before = model_stats(stats_server, "batched_py")
    before_batches = {
        int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in before["batch_stats"]
    }

    def one(i: int) -> None:
        client = httpclient.InferenceServerClient(stats_server.url, network_timeout=30)
        inp = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(np.full((1, 4), i, np.float32))
        client.infer("batched_py", [inp])
        client.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))
    target = int(before["inference_count"]) + 8
    entry = wait_for(stats_server, "batched_py", lambda e: int(e["inference_count"]) >= target)
    assert int(entry["inference_count"]) == target
    assert counts(entry)[0] == counts(before)[0] + 8
    executions = int(entry["execution_count"]) - int(before["execution_count"])
    batches = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in entry["batch_stats"]}
    new = {size: n - before_batches.get(size, 0) for size, n in batches.items()}
    assert sum(size * n for size, n in new.items()) == 8
    assert sum(new.values()) == executions
    assert executions <= 4, new  # batched: not one execution per request
    assert max(size for size, n in new.items() if n) >= 2, new


def test_all_models_and_one(stats_server):
    http = httpclient.InferenceServerClient(stats_server.url)
    grpc = grpcclient.InferenceServerClient(stats_server.grpc_url)
    try:
        every = http.get_inference_statistics()["model_stats"]
        assert sorted((e["name"], e["version"]) for e in every) == [
            ("batched_py", "1"),
            ("python_error", "1"),
            ("simple", "1"),
        ]
        for entry in every:
            assert entry["response_stats"] == {}
            assert set(entry["inference_stats"]) == {
                "success",
                "fail",
                "queue",
                "compute_input",
                "compute_infer",
                "compute_output",
                "cache_hit",
                "cache_miss",
            }
        one = grpc.get_inference_statistics("simple", "1", as_json=True)["model_stats"]
        assert [(e["name"], e["version"]) for e in one] == [("simple", "1")]
        proto = grpc.get_inference_statistics()
        assert sorted(s.name for s in proto.model_stats) == ["batched_py", "python_error", "simple"]
    finally:
        http.close()
        grpc.close()


def test_unknown_model_is_an_error(stats_server):
    http = httpclient.InferenceServerClient(stats_server.url)
    grpc = grpcclient.InferenceServerClient(stats_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="nope"):
            http.get_inference_statistics("nope")
        with pytest.raises(InferenceServerException, match="nope"):
            grpc.get_inference_statistics("nope")
        with pytest.raises(InferenceServerException, match="version 7"):
            http.get_inference_statistics("simple", "7")
    finally:
        http.close()
        grpc.close()


def test_statistics_in_server_extensions(stats_server):
    client = httpclient.InferenceServerClient(stats_server.url)
    try:
        assert "statistics" in client.get_server_metadata()["extensions"]
    finally:
        client.close()
