"""``--speed-paths=off``: every speed path off (docs/architecture.md#speed-paths), and the
server still answers HTTP (binary and JSON) and gRPC, for an ONNX model that direct
routes would serve and a Python model whose instance now runs on its thread. Every
service says which paths it took, and with direct routes off a request waits for the
scheduler (answered only once it runs again)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import SHIPPED_REPOSITORY, DespinaServer, scheduler_frozen

ALL_OFF = (
    "speed paths on: none; off: request memo, burst sends, busy polling, loop execution, "
    "direct routes"
)
SERVICES = ("despina.services.scheduler", "despina.services.frontend", "--framework onnxruntime")


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain-repo")
    for model in ("simple", "add_sub"):
        shutil.copytree(SHIPPED_REPOSITORY / model, root / model)
    srv = DespinaServer(
        root, tmp_path_factory.mktemp("logs") / "serve.log", ["--speed-paths=off"]
    ).start()
    yield srv
    srv.stop()


def simple_inputs(module, a: np.ndarray, b: np.ndarray, binary: bool = True) -> list:
    inputs = []
    for name, data in (("INPUT0", a), ("INPUT1", b)):
        inp = module.InferInput(name, [1, 16], "INT32")
        if module is httpclient:
            inp.set_data_from_numpy(data, binary_data=binary)
        else:
            inp.set_data_from_numpy(data)
        inputs.append(inp)
    return inputs


def test_every_service_runs_with_every_speed_path_off(plain_server):
    log = plain_server.log_path.read_text(errors="replace")
    # One line per process: the scheduler, the frontend, the ONNX host, the Python host
    # (launcher), each instance process it forks after a load.
    assert log.count(ALL_OFF) >= 4, log
    for needle in SERVICES:
        [pid] = plain_server.child_pids(needle)
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        for flag in (b"--request-memo=false", b"--burst-sends=false", b"--busy-poll-us=0"):
            assert flag in cmdline, (needle, cmdline)
        assert b"--loop-execution=false" in cmdline and b"--direct-routes=false" in cmdline


def test_http_and_grpc_answer_repeated_requests_with_their_own_data(plain_server):
    """The same metadata each time (what a memo would rebuild from), new data each time:
    every answer is this request's."""
    http = httpclient.InferenceServerClient(plain_server.url)
    grpc = grpcclient.InferenceServerClient(plain_server.grpc_url)
    for i in range(4):
        a = np.arange(16, dtype=np.int32).reshape(1, 16) * (i + 1)
        b = np.full((1, 16), i, dtype=np.int32)
        for binary in (True, False):
            result = http.infer("simple", simple_inputs(httpclient, a, b, binary))
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        result = grpc.infer("simple", simple_inputs(grpcclient, a, b))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_a_python_model_answers_from_its_instance_thread(plain_server):
    http = httpclient.InferenceServerClient(plain_server.url)
    for i in range(3):
        a = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 16) + i
        b = np.full((1, 16), 0.5, dtype=np.float32)
        inputs = []
        for name, data in (("INPUT0", a), ("INPUT1", b)):
            inp = httpclient.InferInput(name, [1, 16], "FP32")
            inp.set_data_from_numpy(data)
            inputs.append(inp)
        result = http.infer("add_sub", inputs)
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b)


def test_without_direct_routes_a_default_scheduled_model_waits_for_the_scheduler(plain_server):
    """``simple`` (Triton's default scheduler) would take a direct route: here no answer
    comes while the scheduler is frozen, and one comes once it runs again."""
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 2, dtype=np.int32)
    client = httpclient.InferenceServerClient(plain_server.url, network_timeout=10.0)
    try:
        client.infer("simple", simple_inputs(httpclient, a, b))  # everything is up
    finally:
        client.close()
    with scheduler_frozen(plain_server):
        hurried = httpclient.InferenceServerClient(plain_server.url, network_timeout=1.0)
        try:
            with pytest.raises(TimeoutError):  # the client gave up: no answer came
                hurried.infer("simple", simple_inputs(httpclient, a, b))
        finally:
            hurried.close()
    client = httpclient.InferenceServerClient(plain_server.url, network_timeout=10.0)
    try:
        result = client.infer("simple", simple_inputs(httpclient, a, b))
    finally:
        client.close()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
