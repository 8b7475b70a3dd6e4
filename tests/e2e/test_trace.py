"""The trace extension end to end (Triton's ``/v2[/models/m]/trace/setting`` and gRPC
``TraceSetting``): the settings start from ``--trace-config`` (Triton's syntax), change
globally and per model with tritonclient over HTTP and gRPC (sync and aio), a model's
settings fall back to the global ones field by field (and again once cleared with
null), and the trace file holds Triton's JSON for exactly the sampled requests
(``trace_rate`` 2: every other one), each with its timestamps in order."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, DespinaServer, serve_refused

ORDER = ["REQUEST_START", "QUEUE_START", "REQUEST_END"]


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


def _infer_simple(server: DespinaServer, n: int, tag: str) -> None:
    client = httpclient.InferenceServerClient(server.url)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [httpclient.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
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
            found = [t for t in json.loads(trace_file.read_text()) if t["model_name"] == model]
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
        names = [s["name"] for s in trace["timestamps"]]
        assert names == ORDER
        stamps = [s["ns"] for s in trace["timestamps"]]
        assert stamps == sorted(stamps)
        assert before <= stamps[0] and stamps[-1] <= after


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


def test_opentelemetry_mode_refuses_to_start(tmp_path):
    (tmp_path / "simple").symlink_to(SHIPPED_REPOSITORY / "simple")
    done, _ = serve_refused(tmp_path, "--trace-config=mode=opentelemetry")
    assert done.returncode != 0
    assert "OpenTelemetry trace export is not supported" in done.stderr + done.stdout
