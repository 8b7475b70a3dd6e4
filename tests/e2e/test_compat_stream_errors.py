"""Triton's ``triton_grpc_error`` mode of ModelStreamInfer, on both gRPC transports (the
lean h2server and grpc.aio): a stream opened with the header ``triton_grpc_error: true``
ends with a failed request's gRPC status and message, which ``tritonclient.grpc`` hands
the callback as an InferenceServerException with that status; without the header the
error stays in-band (``error_message``) and the stream goes on. After each, the same
server (no process restarted) answers a normal inference."""

from __future__ import annotations

import queue
import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, DespinaServer

HEADERS = {"triton_grpc_error": "true"}


@pytest.fixture(scope="module", params=["auto", "grpcio"])
def server(request, tmp_path_factory):
    repo = tmp_path_factory.mktemp("stream-errors-repo")
    shutil.copytree(SHIPPED_REPOSITORY / "simple", repo / "simple")
    log = tmp_path_factory.mktemp("stream-errors-logs") / "serve.log"
    srv = DespinaServer(repo, log, env={"DESPINA_GRPC_TRANSPORT": request.param}).start()
    yield srv
    assert srv.stop() == 0


def _inputs(shape=(1, 16)) -> list[grpcclient.InferInput]:
    a = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    inputs = [grpcclient.InferInput(n, list(shape), "INT32") for n in ("INPUT0", "INPUT1")]
    for inp in inputs:
        inp.set_data_from_numpy(a)
    return inputs


def _next(results: queue.Queue):
    return results.get(timeout=10)


def _normal_inference_works(server: DespinaServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    result = client.infer("simple", _inputs())
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT0"), 2 * np.arange(16, dtype=np.int32).reshape(1, 16)
    )
    client.close()


def _unary_error(server: DespinaServer, model: str, inputs) -> InferenceServerException:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, inputs)
    finally:
        client.close()
    return info.value


@pytest.mark.parametrize(
    "model, shape, status",
    [("nope", (1, 16), "StatusCode.NOT_FOUND"), ("simple", (1, 15), "StatusCode.INVALID_ARGUMENT")],
)
def test_grpc_error_mode_ends_the_stream_with_the_status(server, model, shape, status):
    unary = _unary_error(server, model, _inputs(shape))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(
        callback=lambda result, error: results.put((result, error)), headers=HEADERS
    )
    try:
        client.async_stream_infer("simple", _inputs(), request_id="good")
        result, error = _next(results)
        assert error is None and result.get_response().id == "good"
        client.async_stream_infer(model, _inputs(shape), request_id="bad")
        result, error = _next(results)
        assert result is None and isinstance(error, InferenceServerException)
        # The stream's gRPC status, with the status and message unary ModelInfer gives.
        assert error.status() == status == unary.status()
        assert error.message() == unary.message()
        assert model in error.message() or "15" in error.message()
        # The stream is over: tritonclient refuses to send on it.
        with pytest.raises(InferenceServerException, match="no longer in valid state"):
            client.async_stream_infer("simple", _inputs(), request_id="after")
        assert results.empty()
    finally:
        client.stop_stream()
        client.close()
    _normal_inference_works(server)


def test_without_the_header_the_error_is_in_band_and_the_stream_goes_on(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("nope", _inputs(), request_id="bad")
        result, error = _next(results)
        assert result is None and isinstance(error, InferenceServerException)
        assert error.status() is None  # an error_message, not a gRPC status
        assert "nope" in error.message()
        client.async_stream_infer("simple", _inputs(), request_id="good")
        result, error = _next(results)
        assert error is None and result.get_response().id == "good"
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((1, 16), dtype=np.int32))
    finally:
        client.stop_stream()
        client.close()
    _normal_inference_works(server)


def test_header_false_keeps_errors_in_band(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(
        callback=lambda result, error: results.put((result, error)),
        headers={"triton_grpc_error": "false"},
    )
    try:
        client.async_stream_infer("nope", _inputs(), request_id="bad")
        _, error = _next(results)
        assert error.status() is None and "nope" in error.message()
        client.async_stream_infer("simple", _inputs(), request_id="good")
        result, error = _next(results)
        assert error is None and result.get_response().id == "good"
    finally:
        client.stop_stream()
        client.close()
