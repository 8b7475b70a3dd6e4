"""Direct routes: a request for a model on Triton's default scheduler, or with plain
dynamic batching (the backend host batches), goes from the frontend straight to a
backend host, so it is answered while the scheduler process is frozen (SIGSTOP); a model
queued by priority still waits for the scheduler, and so does every model when the
server runs with ``--direct-routes=false``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, DespinaServer, needs_speed_path, scheduler_frozen


def _copy_simple(root, name: str, extra: str) -> None:
    shutil.copytree(SHIPPED_REPOSITORY / "simple", root / name)
    config = (root / name / "config.pbtxt").read_text().replace('"simple"', f'"{name}"')
    (root / name / "config.pbtxt").write_text(config + extra)


def _repository(root):
    shutil.copytree(SHIPPED_REPOSITORY / "simple", root / "simple")
    _copy_simple(root, "simple_dyn", "dynamic_batching { max_queue_delay_microseconds: 100 }\n")
    _copy_simple(
        root,
        "simple_prio",
        "dynamic_batching { priority_levels: 2 default_priority_level: 1 }\n",
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


@needs_speed_path("direct routes")
@pytest.mark.parametrize("model", ["simple", "simple_dyn"])
def test_model_is_served_while_the_scheduler_is_frozen(direct_server, model):
    http_infer(direct_server, model)  # the routes have reached the frontend
    with scheduler_frozen(direct_server):
        for _ in range(3):
            result = http_infer(direct_server, model)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
            assert result.get_response()["model_version"] == "1"
        result = grpc_infer(direct_server, model)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)
        # The frontend checks what it sends directly, with Triton's words.
        client = httpclient.InferenceServerClient(direct_server.url, network_timeout=10)
        wrong = httpclient.InferInput("INPUT0", [1, 16], "FP32")
        wrong.set_data_from_numpy(A.astype(np.float32))
        other = httpclient.InferInput("INPUT1", [1, 16], "INT32")
        other.set_data_from_numpy(B)
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, [wrong, other])
        assert info.value.status() == "400"
        assert f"data-type is 'FP32', but model '{model}' expects 'INT32'" in info.value.message()
        client.close()


def test_priority_queued_model_waits_for_the_scheduler(direct_server):
    np.testing.assert_array_equal(
        http_infer(direct_server, "simple_prio").as_numpy("OUTPUT0"), A + B
    )
    with scheduler_frozen(direct_server):
        with pytest.raises(TimeoutError):  # the client gave up: no answer came
            http_infer(direct_server, "simple_prio", timeout=1.0)
    np.testing.assert_array_equal(
        http_infer(direct_server, "simple_prio").as_numpy("OUTPUT1"), A - B
    )


def test_without_direct_routes_every_request_waits_for_the_scheduler(scheduled_server):
    np.testing.assert_array_equal(http_infer(scheduled_server, "simple").as_numpy("OUTPUT0"), A + B)
    with scheduler_frozen(scheduled_server):
        with pytest.raises(TimeoutError):  # the client gave up: no answer came
            http_infer(scheduled_server, "simple", timeout=1.0)
    np.testing.assert_array_equal(http_infer(scheduled_server, "simple").as_numpy("OUTPUT1"), A - B)
