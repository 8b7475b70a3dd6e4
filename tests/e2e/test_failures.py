"""A backend host that dies mid-request: the request fails with an error (no hang),
the host is restarted, and requests succeed again."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, DespinaServer


@pytest.fixture()
def fresh_server(request, tmp_path, generator):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(SHIPPED_REPOSITORY / "simple", repo / "simple")
    generator.python_slow(repo)
    srv = DespinaServer(repo, tmp_path / "serve.log", getattr(request, "param", [])).start()
    yield srv
    srv.stop()


def slow_request(url: str, sleep_ms: int):
    client = httpclient.InferenceServerClient(url, network_timeout=60)
    inp = httpclient.InferInput("SLEEP_MS", [1], "INT32")
    inp.set_data_from_numpy(np.array([sleep_ms], np.int32))
    try:
        return client.infer("slow", [inp])
    finally:
        client.close()


def wait_model_ready(client, model: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.is_model_ready(model):
            return
        time.sleep(0.1)
    raise TimeoutError(f"model {model} did not become ready again")


def serve_again(url: str, timeout: float = 30.0):
    """The first answer after the instance's process died. Until the scheduler has
    noticed the loss and a new process has joined, the model may still read READY (the
    frontend failed the direct request the moment its link closed) or be UNAVAILABLE:
    503s only, as a client retrying would see them."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return slow_request(url, 1)
        except InferenceServerException as exc:
            if exc.status() != "503" or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# A direct request is failed by the frontend that sent it (the host's link closed), a
# scheduled one by the scheduler (the host's stream closed): same status, same words.
@pytest.mark.parametrize(
    "fresh_server", [[], ["--direct-routes=false"]], ids=["direct", "scheduled"], indirect=True
)
def test_python_instance_killed_mid_request(fresh_server):
    client = httpclient.InferenceServerClient(fresh_server.url)
    first = slow_request(fresh_server.url, 0)
    pid = int(first.as_numpy("PID")[0])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(slow_request, fresh_server.url, 20_000)
        time.sleep(0.5)  # the request is now running inside the instance process
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            future.result(timeout=15)
        assert time.monotonic() - started < 10
    assert info.value.status() == "503"
    assert "exited while the request was in flight" in info.value.message()
    again = serve_again(fresh_server.url)
    assert int(again.as_numpy("PID")[0]) != pid
    assert int(again.as_numpy("SLEPT_MS")[0]) == 1
    client.close()


def test_onnxruntime_host_killed_is_restarted(fresh_server):
    client = httpclient.InferenceServerClient(fresh_server.url)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)

    def infer():
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            inp = httpclient.InferInput(name, [1, 16], "INT32")
            inp.set_data_from_numpy(a)
            inputs.append(inp)
        return client.infer("simple", inputs)

    np.testing.assert_array_equal(infer().as_numpy("OUTPUT0"), 2 * a)
    pids = fresh_server.child_pids("--framework onnxruntime")
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.2)
    wait_model_ready(client, "simple")
    np.testing.assert_array_equal(infer().as_numpy("OUTPUT1"), 0 * a)
    new_pids = fresh_server.child_pids("--framework onnxruntime")
    assert len(new_pids) == 1 and new_pids != pids
    assert (
        "backend-onnxruntime (pid" in fresh_server.log() and "restarting it" in fresh_server.log()
    )
    client.close()


def test_sigterm_drains_in_flight_request(fresh_server):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(slow_request, fresh_server.url, 1500)
        time.sleep(0.4)
        fresh_server.proc.send_signal(signal.SIGTERM)
        result = future.result(timeout=20)
    assert int(result.as_numpy("SLEPT_MS")[0]) == 1500
    assert fresh_server.proc.wait(20) == 0
    assert "all services stopped" in fresh_server.log()
