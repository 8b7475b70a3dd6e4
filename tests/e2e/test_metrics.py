"""GET /metrics: Triton's metric names, types and labels (parsed with prometheus_client's
own parser), counts that match the requests sent exactly across two frontends and two
backend hosts (direct and scheduled routes), the per-stage histograms whose buckets add
up, and no endpoint under --allow-metrics=false."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
import test_statistics
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from test_statistics import error_inputs, model_stats, simple_inputs, stats_repository
from tritonclient.utils import InferenceServerException

from conftest import DespinaServer

# The per-model metrics Triton exposes, and their types.
TRITON_MODEL_METRICS = {
    "nv_inference_request_success": "counter",
    "nv_inference_request_failure": "counter",
    "nv_inference_count": "counter",
    "nv_inference_exec_count": "counter",
    "nv_inference_request_duration_us": "counter",
    "nv_inference_queue_duration_us": "counter",
    "nv_inference_compute_input_duration_us": "counter",
    "nv_inference_compute_infer_duration_us": "counter",
    "nv_inference_compute_output_duration_us": "counter",
    "nv_inference_pending_request_count": "gauge",
    "nv_cache_num_hits_per_model": "counter",
    "nv_cache_num_misses_per_model": "counter",
    "nv_cache_hit_duration_per_model": "counter",
    "nv_cache_miss_duration_per_model": "counter",
}
MACHINE_METRICS = ("nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes")
DEADLINE_S = 10.0

stats_server = test_statistics.stats_server  # the server both modules share (a fixture)


def scrape(srv: DespinaServer) -> tuple[str, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict, name: str, **labels: str) -> float:
    """The one sample of ``name`` with these labels (a counter's sample is named _total
    by the parser)."""
    found = [
        s.value
        for s in families[name].samples
        if s.name in (name, name + "_total")
        and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def wait_metric(srv: DespinaServer, name: str, target: float, **labels: str) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        _, families = scrape(srv)
        if value(families, name, **labels) >= target or time.monotonic() > deadline:
            return families
        time.sleep(0.05)


def test_names_types_and_labels_are_tritons(stats_server):
    text, families = scrape(stats_server)
    for name, kind in TRITON_MODEL_METRICS.items():
        assert families[name].type == kind, name
        # Triton's exact spelling: a counter's TYPE line names it without _total.
        assert f"# TYPE {name} {kind}\n" in text
        for sample in families[name].samples:
            expected = {"model", "version"} | (
                {"reason"} if name == "nv_inference_request_failure" else set()
            )
            assert set(sample.labels) == expected, (name, sample.labels)
    models = {s.labels["model"] for s in families["nv_inference_request_success"].samples}
    assert models == {"simple", "python_error", "batched_py"}
    reasons = {s.labels["reason"] for s in families["nv_inference_request_failure"].samples}
    assert reasons == {"REJECTED", "CANCELED", "BACKEND", "OTHER"}
    for name in MACHINE_METRICS:
        assert families[name].type == "gauge"
        (sample,) = families[name].samples
        assert sample.labels == {}
    assert 0.0 <= value(families, "nv_cpu_utilization") <= 1.0
    total = value(families, "nv_cpu_memory_total_bytes")
    assert 0 < value(families, "nv_cpu_memory_used_bytes") <= total
    # No response cache yet: its metrics are there, at zero.
    assert all(s.value == 0 for s in families["nv_cache_num_hits_per_model"].samples)


def test_pending_counts_requests_waiting_for_a_batch(stats_server):
    """Three requests to ``batched_py`` (a 500 ms queue delay, batches of up to 8) wait
    for their batch: in a backend host's batcher on direct routes, in the scheduler's on
    scheduled ones. Triton's pending gauge counts them while they wait, then 0."""
    labels = {"model": "batched_py", "version": "1"}
    clients = [httpclient.InferenceServerClient(stats_server.url) for _ in range(3)]
    start = threading.Barrier(3)

    def one(client) -> None:
        tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        start.wait()
        client.infer("batched_py", [tensor])

    seen = []
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        done = [pool.submit(one, client) for client in clients]
        while not all(f.done() for f in done):
            _, families = scrape(stats_server)
            seen.append(value(families, "nv_inference_pending_request_count", **labels))
            time.sleep(0.02)
        for f in done:
            f.result()
    for client in clients:
        client.close()
    assert max(seen) == 3, seen
    _, families = scrape(stats_server)
    assert value(families, "nv_inference_pending_request_count", **labels) == 0


def test_counts_match_requests_and_statistics(stats_server):
    _, families = scrape(stats_server)
    before = value(families, "nv_inference_request_success", model="simple", version="1")
    before_fail = value(
        families,
        "nv_inference_request_failure",
        model="python_error",
        version="1",
        reason="BACKEND",
    )
    http = httpclient.InferenceServerClient(stats_server.url)
    grpc = grpcclient.InferenceServerClient(stats_server.grpc_url)
    for _ in range(5):
        http.infer("simple", simple_inputs(httpclient))
        grpc.infer("simple", simple_inputs(grpcclient))
    for client, module in ((http, httpclient), (grpc, grpcclient)):
        with pytest.raises(InferenceServerException):
            client.infer("python_error", error_inputs(module, -1.0))
    http.close()
    grpc.close()
    wait_metric(
        stats_server,
        "nv_inference_request_failure",
        before_fail + 2,
        model="python_error",
        version="1",
        reason="BACKEND",
    )
    families = wait_metric(
        stats_server, "nv_inference_request_success", before + 10, model="simple", version="1"
    )
    simple = {"model": "simple", "version": "1"}
    success = value(families, "nv_inference_request_success", **simple)
    assert success == before + 10
    assert (
        value(
            families,
            "nv_inference_request_failure",
            model="python_error",
            version="1",
            reason="BACKEND",
        )
        == before_fail + 2
    )
    # The same totals as the statistics extension (nothing else runs on this server now).
    entry = model_stats(stats_server, "simple")
    stats = entry["inference_stats"]
    assert int(stats["success"]["count"]) == success
    assert value(families, "nv_inference_count", **simple) == int(entry["inference_count"])
    assert value(families, "nv_inference_exec_count", **simple) == int(entry["execution_count"])
    for metric, stage in (
        ("nv_inference_request_duration_us", "success"),
        ("nv_inference_queue_duration_us", "queue"),
        ("nv_inference_compute_input_duration_us", "compute_input"),
        ("nv_inference_compute_infer_duration_us", "compute_infer"),
        ("nv_inference_compute_output_duration_us", "compute_output"),
    ):
        assert value(families, metric, **simple) == pytest.approx(int(stats[stage]["ns"]) / 1000)
    assert value(families, "nv_inference_request_duration_us", **simple) > 0
    assert value(families, "nv_inference_pending_request_count", **simple) == 0


def test_stage_histograms_add_up(stats_server):
    _, families = scrape(stats_server)
    hist = families["despina_stage_duration_us"]
    assert hist.type == "histogram"
    entry = model_stats(stats_server, "simple")
    success = int(entry["inference_stats"]["success"]["count"])
    executed = int(entry["inference_stats"]["compute_infer"]["count"])
    assert success > 0
    expected = {
        "request": success,
        "frontend_decode": success,
        "frontend_encode": success,
        "queue": executed,
        "compute_input": executed,
        "compute": executed,
        "output": executed,
    }
    for stage, count in expected.items():
        labels = {"stage": stage, "model": "simple", "version": "1"}
        buckets = [
            (float(s.labels["le"]), s.value)
            for s in hist.samples
            if s.name.endswith("_bucket") and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert buckets, stage
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf")
        cumulative = [v for _, v in buckets]
        assert cumulative == sorted(cumulative), stage
        assert cumulative[-1] == count, stage
        (total,) = [
            s.value
            for s in hist.samples
            if s.name == "despina_stage_duration_us_count" and s.labels == labels
        ]
        assert total == count, stage


def test_gpu_metrics_when_a_gpu_is_there(stats_server):
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        gpus = pynvml.nvmlDeviceGetCount()
    except Exception:
        gpus = 0
    if not gpus:
        pytest.skip("no NVIDIA GPU (or no pynvml) on this machine: GPU metrics are not served")
    _, families = scrape(stats_server)
    for name in ("nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes"):
        assert len(families[name].samples) == gpus
        assert all("gpu_uuid" in s.labels for s in families[name].samples)


def test_allow_metrics_false_serves_nothing(tmp_path, generator):
    root = stats_repository(tmp_path / "repo", generator)
    srv = DespinaServer(root, tmp_path / "serve.log", ["--allow-metrics=false"]).start()
    try:
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex(("127.0.0.1", srv.metrics_port)) != 0
        client = httpclient.InferenceServerClient(srv.url)
        client.infer("simple", simple_inputs(httpclient))
        # Nothing counts: the statistics extension is refused (501) with the flag named,
        # not answered with zeros, and it is not in the server's extensions.
        with pytest.raises(InferenceServerException) as info:
            client.get_inference_statistics("simple")
        assert info.value.status() == "501"
        assert "--allow-metrics=true" in info.value.message()
        assert "statistics" not in client.get_server_metadata()["extensions"]
        client.close()
    finally:
        srv.stop()
