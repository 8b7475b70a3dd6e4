"""Triton's raw binary requests (``Inference-Header-Content-Length: 0``: the whole body is
the bytes of the model's one input, its metadata from the model configuration, every
output binary) on both HTTP transports, with Triton's refusals for a model the input
cannot be deduced for; after each refusal the same server answers a normal request."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from conftest import assert_serves_simple, serve_shipped_over

MODELS = ("simple", "identity_fp32")


@pytest.fixture(scope="module", params=["lean", "aiohttp"])
def server(request, tmp_path_factory):
    srv = serve_shipped_over(request.param, tmp_path_factory, MODELS)
    yield srv
    assert srv.stop() == 0


def _post_raw(server, model: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    try:
        conn.request(
            "POST",
            f"/v2/models/{model}/infer",
            body=body,
            headers={"Inference-Header-Content-Length": "0"},
        )
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _split(headers: dict[str, str], body: bytes) -> tuple[dict, bytes]:
    length = int(headers["Inference-Header-Content-Length"])
    return json.loads(body[:length]), body[length:]


def _normal_inference_works(server) -> None:
    assert_serves_simple(server.url)


@pytest.mark.parametrize("count", [8, 1 << 19])  # 32 bytes, and 2 MiB (a shared-memory body)
def test_raw_binary_identity_returns_the_input_as_binary(server, count):
    data = np.arange(count, dtype=np.float32)
    status, headers, body = _post_raw(server, "identity_fp32", data.tobytes())
    assert status == 200, body[:300]
    assert headers["Content-Type"] == "application/octet-stream"
    header, blob = _split(headers, body)
    (output,) = header["outputs"]
    assert output["name"] == "OUTPUT0" and output["datatype"] == "FP32"
    assert output["shape"] == [1, count]
    assert output["parameters"]["binary_data_size"] == 4 * count
    np.testing.assert_array_equal(np.frombuffer(blob, np.float32), data)


def test_raw_binary_refused_for_a_model_with_two_inputs(server):
    status, headers, body = _post_raw(server, "simple", np.arange(32, dtype=np.int32).tobytes())
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {
        "error": "Raw request must only have 1 input (found 1) to be deduced but got 2 "
        "inputs in 'simple' model configuration"
    }
    _normal_inference_works(server)


def test_raw_binary_body_that_does_not_fit_the_dtype_is_refused(server):
    status, _, body = _post_raw(server, "identity_fp32", b"\x00" * 10)
    assert status == 400
    message = json.loads(body)["error"]
    assert "unexpected total byte size 10 for raw input 'INPUT0'" in message
    assert "expecting 8" in message
    _normal_inference_works(server)


def test_raw_binary_unknown_model_is_refused_as_a_json_request_is(server):
    status, _, body = _post_raw(server, "no_such_model", b"\x00" * 4)
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    doc = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [0.0]}]}
    conn.request("POST", "/v2/models/no_such_model/infer", body=json.dumps(doc))
    response = conn.getresponse()
    json_status, json_body = response.status, json.loads(response.read())
    conn.close()
    assert status == json_status == 404
    assert json.loads(body) == json_body
    assert "no_such_model" in json_body["error"]
    _normal_inference_works(server)
