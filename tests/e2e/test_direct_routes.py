"""Direct routes: a request for a model on Triton's default scheduler goes from the
frontend straight to a backend host, so it is answered while the scheduler process is
frozen (SIGSTOP); a dynamically batched model still waits for the scheduler, and so does
every model when the server runs with ``--direct-routes=false``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, DespinaServer


def _repository(root):
    shutil.copytree(SHIPPED_REPOSITORY / "simple", root / "simple")
    shutil.copytree(SHIPPED_REPOSITORY / "simple", root / "simple_dyn")
    config = (root / "simple_dyn" / "config.pbtxt").read_text().replace('"simple"', '"simple_dyn"')
    (root / "simple_dyn" / "config.pbtxt").write_text(
        config + "dynamic_batching { max_queue_delay_microseconds: 100 }\n"
    )
    return root


@pytest.fixture(scope="module")
def direct_server(tmp_path_factory):
    root = _repository(tmp_path_factory.mktemp("direct"))
    srv = DespinaServer(root, tmp_path_factory.mktemp("logs") / "serve.log").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def scheduled_server(tmp_path_factory):
    root = _repository(tmp_path_factory.mktemp("scheduled"))
    srv = DespinaServer(
        root, tmp_path_factory.mktemp("logs") / "serve.log", ["--direct-routes=false"]
    ).start()
    yield srv
    srv.stop()


@contextlib.contextmanager
def scheduler_frozen(server: DespinaServer):
    [pid] = server.child_pids("despina.services.scheduler")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.full((1, 16), 3, dtype=np.int32)


def http_infer(server: DespinaServer, model: str, timeout: float = 10.0):
    client = httpclient.InferenceServerClient(server.url, network_timeout=timeout)
    inputs = []
    for name, data in (("INPUT0", A), ("INPUT1", B)):
        inp = httpclient.InferInput(name, [1, 16], "INT32")
        inp.set_data_from_numpy(data, binary_data=True)
        inputs.append(inp)
    try:
        return client.infer(model, inputs)
    finally:
        client.close()


def grpc_infer(server: DespinaServer, model: str):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for name, data in (("INPUT0", A), ("INPUT1", B)):
        inp = grpcclient.InferInput(name, [1, 16], "INT32")
        inp.set_data_from_numpy(data)
        inputs.append(inp)
    try:
        return client.infer(model, inputs, client_timeout=10)
    finally:
        client.close()


def test_default_scheduled_model_is_served_while_the_scheduler_is_frozen(direct_server):
    http_infer(direct_server, "simple")  # the routes have reached the frontend
    with scheduler_frozen(direct_server):
        for _ in range(3):
            result = http_infer(direct_server, "simple")
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
            assert result.get_response()["model_version"] == "1"
        result = grpc_infer(direct_server, "simple")
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
        # The frontend checks what it sends directly, with Triton's words.
        client = httpclient.InferenceServerClient(direct_server.url, network_timeout=10)
        wrong = httpclient.InferInput("INPUT0", [1, 16], "FP32")
        wrong.set_data_from_numpy(A.astype(np.float32))
        other = httpclient.InferInput("INPUT1", [1, 16], "INT32")
        other.set_data_from_numpy(B)
        with pytest.raises(InferenceServerException) as info:
            client.infer("simple", [wrong, other])
        assert info.value.status() == "400"
        assert "data-type is 'FP32', but model 'simple' expects 'INT32'" in info.value.message()
        client.close()


def test_batched_model_waits_for_the_scheduler(direct_server):
    np.testing.assert_array_equal(
        http_infer(direct_server, "simple_dyn").as_numpy("OUTPUT0"), A + B
    )
    with scheduler_frozen(direct_server):
        with pytest.raises(TimeoutError):  # the client gave up: no answer came
            http_infer(direct_server, "simple_dyn", timeout=1.0)
    np.testing.assert_array_equal(
        http_infer(direct_server, "simple_dyn").as_numpy("OUTPUT1"), A - B
    )


def test_without_direct_routes_every_request_waits_for_the_scheduler(scheduled_server):
    np.testing.assert_array_equal(http_infer(scheduled_server, "simple").as_numpy("OUTPUT0"), A + B)
    with scheduler_frozen(scheduled_server):
        with pytest.raises(TimeoutError):  # the client gave up: no answer came
            http_infer(scheduled_server, "simple", timeout=1.0)
    np.testing.assert_array_equal(http_infer(scheduled_server, "simple").as_numpy("OUTPUT1"), A - B)
