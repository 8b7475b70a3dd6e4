"""deploy/grafana/despina-dashboard.json: valid Grafana JSON, exactly what dashboard_build.py writes
from dashboard_panels.py, and every metric it queries is one a live Despina exposes at /metrics
(scraped here from a real server under a few real requests); the renderer's PromQL
evaluator gives the values a hand computation gives."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
sys.path.insert(0, str(GRAFANA))

import dashboard_build as build  # noqa: E402
import dashboard_render as render  # noqa: E402

from conftest import SHIPPED_REPOSITORY, DespinaServer, free_port  # noqa: E402

METRIC = re.compile(r"\b((?:nv|despina)_[a-z0-9_]+)\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _dashboard() -> dict:
    return json.loads((GRAFANA / "despina-dashboard.json").read_text(encoding="utf-8"))


def _queried() -> set[str]:
    names = set()
    for panel in _dashboard()["panels"]:
        for target in panel["targets"]:
            names.update(METRIC.findall(target["expr"]))
    return names


def test_the_file_is_what_build_writes():
    assert (GRAFANA / "despina-dashboard.json").read_text(encoding="utf-8") == build.text()


def test_grafana_shape():
    doc = _dashboard()
    assert doc["uid"] == "despina-overview" and doc["schemaVersion"] >= 36
    assert doc["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)) == 8
    for panel in doc["panels"]:
        assert panel["type"] == "timeseries" and panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        grid = panel["gridPos"]
        assert grid["w"] + grid["x"] <= 24 and grid["h"] > 0
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")")
            render.Query(target["expr"]).parse()  # the renderer reads every query
    # Triton's names, and Despina's per-stage histogram
    assert {
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_cpu_utilization",
        "despina_stage_duration_us_bucket",
    } <= _queried()


def _scrape(series: dict, t: float, success: float, buckets: dict[str, float]) -> tuple:
    model = frozenset({("model", "m"), ("version", "1")})
    return (
        t,
        {
            "nv_inference_request_success": {model: success},
            "nv_inference_request_duration_us": {model: success * 200.0},
            "despina_stage_duration_us_bucket": {
                frozenset({("stage", "queue"), ("le", le), *model}): v for le, v in buckets.items()
            },
            **series,
        },
    )


def test_the_renderers_promql_as_prometheus_computes_it():
    first = _scrape({}, 0.0, 10, {"100.0": 0, "200.0": 0, "+Inf": 0})
    second = _scrape({}, 2.0, 30, {"100.0": 10, "200.0": 20, "+Inf": 20})
    scrapes = [first, second]
    rate = render.Query(
        "sum by (model) (rate(nv_inference_request_success[$__rate_interval]))"
    ).parse()
    assert render.evaluate(rate, scrapes, 1) == {frozenset({("model", "m")}): 10.0}
    average = render.Query(
        "sum by (model) (rate(nv_inference_request_duration_us[$__rate_interval])) / "
        "sum by (model) (rate(nv_inference_request_success[$__rate_interval]))"
    ).parse()
    assert render.evaluate(average, scrapes, 1) == {frozenset({("model", "m")}): 200.0}
    p75 = render.Query(
        "histogram_quantile(0.75, sum by (le, stage) "
        "(rate(despina_stage_duration_us_bucket[$__rate_interval])))"
    ).parse()
    # 20 observations, 10 at or below 100 µs and 10 in (100, 200]: rank 15 is halfway
    assert render.evaluate(p75, scrapes, 1) == {frozenset({("stage", "queue")}): 150.0}


@pytest.fixture(scope="module")
def metrics_text(tmp_path_factory) -> str:
    """/metrics of a live server after real requests to an ONNX and a Python model."""
    root = tmp_path_factory.mktemp("repo")
    for model in ("simple", "add_sub"):
        shutil.copytree(SHIPPED_REPOSITORY / model, root / model)
    port = free_port()
    srv = DespinaServer(
        root,
        tmp_path_factory.mktemp("logs") / "serve.log",
        [f"--metrics-port={port}", "--allow-metrics=true"],
    ).start()
    try:
        client = httpclient.InferenceServerClient(srv.url)
        for model, dtype, data in (
            ("simple", "INT32", np.arange(16, dtype=np.int32).reshape(1, 16)),
            ("add_sub", "FP32", np.ones((1, 16), dtype=np.float32)),
        ):
            inputs = [httpclient.InferInput(f"INPUT{k}", [1, 16], dtype) for k in (0, 1)]
            for tensor in inputs:
                tensor.set_data_from_numpy(data)
            assert (
                client.infer(model, inputs).as_numpy("OUTPUT0").tolist() == (data + data).tolist()
            )
        text = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # counts arrive in batched reports
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            text = text.decode()
            if 'nv_inference_request_success{model="add_sub",version="1"} 1.0' in text and (
                "despina_stage_duration_us_bucket" in text
            ):
                break
            time.sleep(0.2)
        return text
    finally:
        srv.stop()


def test_every_queried_metric_is_exposed_by_a_live_server(metrics_text):
    exposed = set(render.parse_scrape(metrics_text))
    for name in _queried():
        assert name in exposed, f"{name} is queried by the dashboard but not served"
    # and the values the panels read are the requests sent
    scrape = render.parse_scrape(metrics_text)
    success = {dict(k)["model"]: v for k, v in scrape["nv_inference_request_success"].items()}
    assert success["simple"] == 1.0 and success["add_sub"] == 1.0
    stages = {dict(k)["stage"] for k in scrape["despina_stage_duration_us_bucket"]}
    assert {"request", "queue", "compute"} <= stages
