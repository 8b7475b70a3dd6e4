"""The HTTP/REST v2 core against real processes, driven by tritonclient.http."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from conftest import TRANSPORTS


# Both transports of each protocol: lean HTTP + Despina's HTTP/2 gRPC, aiohttp + grpc.aio.
@pytest.fixture(scope="module", params=TRANSPORTS)
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://{server.url}{path}", data=body, method="POST", headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def make_inputs(names_and_arrays, binary: bool):
    inputs = []
    for name, arr in names_and_arrays:
        inp = httpclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    return inputs


# --- health and metadata ------------------------------------------------------------


def test_health(http_client):
    assert http_client.is_server_live()
    assert http_client.is_server_ready()
    assert http_client.is_model_ready("simple")
    assert http_client.is_model_ready("simple", "1")
    assert not http_client.is_model_ready("simple", "7")
    assert not http_client.is_model_ready("no_such_model")


def test_server_metadata(http_client):
    meta = http_client.get_server_metadata()
    assert meta["name"] == "triton"
    assert "binary_tensor_data" in meta["extensions"]
    assert "model_configuration" in meta["extensions"]


def test_model_metadata(http_client):
    meta = http_client.get_model_metadata("simple")
    assert meta["name"] == "simple"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [
        {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]},
        {"name": "INPUT1", "datatype": "INT32", "shape": [-1, 16]},
    ]
    assert [o["name"] for o in meta["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    assert http_client.get_model_metadata("simple", "1") == meta
    assert http_client.get_model_metadata("add_sub")["platform"] == "python"


def test_model_config(http_client):
    config = http_client.get_model_config("simple")
    assert config["name"] == "simple"
    assert config["max_batch_size"] == 8
    assert config["input"][0]["data_type"] == "TYPE_INT32"
    assert config["input"][0]["dims"] == [16]
    assert config["instance_group"][0]["count"] == 1
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    py = http_client.get_model_config("add_sub")
    assert py["backend"] == "python"


def test_unknown_model_metadata_is_404(http_client):
    with pytest.raises(InferenceServerException) as info:
        http_client.get_model_metadata("no_such_model")
    assert info.value.status() == "404"
    assert "no_such_model" in info.value.message()


def test_repository_index_shows_broken_model_with_reason(http_client):
    index = {entry["name"]: entry for entry in http_client.get_model_repository_index()}
    assert index["simple"]["state"] == "READY"
    assert index["add_sub"]["state"] == "READY"
    assert index["broken_onnx"]["state"] == "UNAVAILABLE"
    assert "onnxruntime could not load" in index["broken_onnx"]["reason"]
    assert not http_client.is_model_ready("broken_onnx")


# --- inference ---------------------------------------------------------------------


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
@pytest.mark.parametrize("model,dtype", [("simple", np.int32), ("add_sub", np.float32)])
def test_add_sub_models(http_client, model, dtype, binary_in, binary_out):
    rng = np.random.default_rng(0)
    a = rng.integers(-100, 100, size=(3, 16)).astype(dtype)
    b = rng.integers(-100, 100, size=(3, 16)).astype(dtype)
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("OUTPUT0", "OUTPUT1")
    ]
    result = http_client.infer(
        model,
        make_inputs([("INPUT0", a), ("INPUT1", b)], binary_in),
        outputs=outputs,
        request_id="req-42",
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response["id"] == "req-42"
    assert response["model_name"] == model
    assert response["model_version"] == "1"


def test_requested_output_subset(http_client):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    outputs = [httpclient.InferRequestedOutput("OUTPUT1")]
    result = http_client.infer(
        "simple", make_inputs([("INPUT0", a), ("INPUT1", a)], True), outputs=outputs
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((1, 16), np.int32))
    assert result.as_numpy("OUTPUT0") is None


def test_nested_and_flat_json_data(server):
    flat = list(range(16))
    nested = [list(range(16))]
    for data in (flat, nested):
        body = json.dumps(
            {
                "inputs": [
                    {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": data},
                    {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": data},
                ]
            }
        ).encode()
        status, response = post(server, "/v2/models/simple/infer", body)
        assert status == 200, response
        assert response["outputs"][0]["data"] == [2 * x for x in range(16)]


ALL_TYPES = [
    ("BOOL", np.bool_),
    ("UINT8", np.uint8),
    ("UINT16", np.uint16),
    ("UINT32", np.uint32),
    ("UINT64", np.uint64),
    ("INT8", np.int8),
    ("INT16", np.int16),
    ("INT32", np.int32),
    ("INT64", np.int64),
    ("FP16", np.float16),
    ("FP32", np.float32),
    ("FP64", np.float64),
]


def random_tensor(np_type, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np_type is np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(np_type, np.integer):
        info = np.iinfo(np_type)
        return rng.integers(info.min, info.max, size=shape, dtype=np_type, endpoint=True)
    return (rng.standard_normal(shape) * 1000).astype(np_type)


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
def test_every_data_type(http_client, binary_in, binary_out):
    """One request carries a tensor of every type the ONNX model accepts, extremes included."""
    tensors = [
        (f"INPUT_{t}", random_tensor(np_type, (2, 5), i))
        for i, (t, np_type) in enumerate(ALL_TYPES)
    ]
    tensors.append(
        (
            "INPUT_BYTES",
            np.array(
                [[b"a", b"bc", b"", "h\u00e9llo w\u00f6rld".encode(), b"z"]] * 2, dtype=object
            ),
        )
    )
    result = http_client.infer(
        "identity_all",
        make_inputs(tensors, binary_in),
        outputs=[
            httpclient.InferRequestedOutput(n.replace("INPUT", "OUTPUT"), binary_data=binary_out)
            for n, _ in tensors
        ],
    )
    for name, data in tensors[:-1]:
        out = result.as_numpy(name.replace("INPUT", "OUTPUT"))
        assert out.dtype == data.dtype, name
        np.testing.assert_array_equal(out, data, err_msg=name)
    out = result.as_numpy("OUTPUT_BYTES")
    assert out.shape == (2, 5)
    got = [x if isinstance(x, bytes) else x.encode() for x in out.reshape(-1)]
    assert got == tensors[-1][1].reshape(-1).tolist()


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_tensors(http_client, binary):
    a = np.array([[str(i) for i in range(16)]], dtype=object)
    b = np.array([["1"] * 16], dtype=object)
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")
    ]
    result = http_client.infer(
        "simple_string", make_inputs([("INPUT0", a), ("INPUT1", b)], binary), outputs=outputs
    )
    sums = [int(x) for x in result.as_numpy("OUTPUT0").reshape(-1)]
    diffs = [int(x) for x in result.as_numpy("OUTPUT1").reshape(-1)]
    assert sums == [i + 1 for i in range(16)]
    assert diffs == [i - 1 for i in range(16)]


def test_variable_dims_and_large_tensor(http_client):
    """A 4 MiB tensor goes through the frontend's shared-memory arena."""
    for n in (1, 7, 1 << 20):
        data = np.random.default_rng(n).standard_normal((1, n)).astype(np.float32)
        result = http_client.infer(
            "identity_fp32",
            make_inputs([("INPUT0", data)], True),
            outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)],
        )
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_version_in_url(http_client):
    a = np.ones((1, 16), np.int32)
    result = http_client.infer(
        "simple", make_inputs([("INPUT0", a), ("INPUT1", a)], True), model_version="1"
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)


def test_parameters_pass_through(http_client):
    a = np.ones((1, 16), np.int32)
    result = http_client.infer(
        "simple",
        make_inputs([("INPUT0", a), ("INPUT1", a)], True),
        parameters={"my_key": "v", "n": 3},
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), 0 * a)


# --- errors: the right status and message, and the server keeps serving ---------------


def assert_still_serving(http_client):
    a = np.full((1, 16), 3, np.int32)
    result = http_client.infer("simple", make_inputs([("INPUT0", a), ("INPUT1", a)], True))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)


def infer_error(http_client, model, inputs, **kw) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        http_client.infer(model, inputs, **kw)
    return info.value


def test_unknown_model(http_client):
    a = np.ones((1, 16), np.int32)
    err = infer_error(http_client, "nope", make_inputs([("INPUT0", a)], False))
    assert err.status() == "404"
    assert "Request for unknown model: 'nope' is not found" in err.message()
    assert_still_serving(http_client)


def test_unknown_version(http_client):
    a = np.ones((1, 16), np.int32)
    err = infer_error(
        http_client, "simple", make_inputs([("INPUT0", a), ("INPUT1", a)], True), model_version="9"
    )
    assert err.status() == "404"
    assert "version 9" in err.message()


@pytest.mark.parametrize("model", ["simple", "add_sub"])
def test_wrong_shape(http_client, model):
    dtype = np.int32 if model == "simple" else np.float32
    a = np.ones((1, 15), dtype)
    err = infer_error(http_client, model, make_inputs([("INPUT0", a), ("INPUT1", a)], False))
    assert err.status() == "400"
    assert "unexpected shape for input 'INPUT0'" in err.message()
    assert "Expected [-1,16], got [1,15]" in err.message()
    too_big = np.ones((9, 16), dtype)
    err = infer_error(
        http_client, model, make_inputs([("INPUT0", too_big), ("INPUT1", too_big)], True)
    )
    assert "batch-size must be <= 8" in err.message()
    assert_still_serving(http_client)


@pytest.mark.parametrize(
    "model,right,wrong", [("simple", "INT32", np.float32), ("add_sub", "FP32", np.int32)]
)
def test_wrong_dtype(http_client, model, right, wrong):
    a = np.ones((1, 16), wrong)
    err = infer_error(http_client, model, make_inputs([("INPUT0", a), ("INPUT1", a)], True))
    assert err.status() == "400"
    assert f"expects '{right}'" in err.message()
    assert "INPUT0" in err.message()
    assert_still_serving(http_client)


@pytest.mark.parametrize("model,dtype", [("simple", np.int32), ("add_sub", np.float32)])
def test_missing_input(http_client, model, dtype):
    a = np.ones((1, 16), dtype)
    err = infer_error(http_client, model, make_inputs([("INPUT0", a)], True))
    assert err.status() == "400"
    assert "missing required input(s) ['INPUT1']" in err.message()
    assert_still_serving(http_client)


def test_unexpected_input_and_output(http_client):
    a = np.ones((1, 16), np.int32)
    err = infer_error(
        http_client, "simple", make_inputs([("INPUT0", a), ("INPUT1", a), ("EXTRA", a)], True)
    )
    assert "unexpected inference input 'EXTRA'" in err.message()
    err = infer_error(
        http_client,
        "simple",
        make_inputs([("INPUT0", a), ("INPUT1", a)], True),
        outputs=[httpclient.InferRequestedOutput("NOPE")],
    )
    assert "unexpected inference output 'NOPE'" in err.message()


def test_malformed_json(server, http_client):
    for body in (b"{not json", b"[]", b'{"inputs": 3}', b'{"inputs": [{"name": "INPUT0"}]}'):
        status, response = post(server, "/v2/models/simple/infer", body)
        assert status == 400, (body, response)
        assert response["error"], body
    status, response = post(server, "/v2/models/simple/infer", b"{not json")
    assert "JSON" in response["error"] or "json" in response["error"]
    assert_still_serving(http_client)


def test_bad_binary_header(server, http_client):
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [1, 16],
                    "datatype": "INT32",
                    "parameters": {"binary_data_size": 64},
                },
                {
                    "name": "INPUT1",
                    "shape": [1, 16],
                    "datatype": "INT32",
                    "parameters": {"binary_data_size": 64},
                },
            ]
        }
    ).encode()
    data = np.ones(32, np.int32).tobytes()
    cases = [
        ({"Inference-Header-Content-Length": "abc"}, header + data),
        ({"Inference-Header-Content-Length": str(len(header) + 10_000)}, header + data),
        ({"Inference-Header-Content-Length": str(len(header))}, header + data[:-4]),
        ({"Inference-Header-Content-Length": str(len(header) - 5)}, header + data),
    ]
    for headers, body in cases:
        status, response = post(server, "/v2/models/simple/infer", body, headers)
        assert status == 400, (headers, response)
        assert response["error"]
    status, response = post(
        server,
        "/v2/models/simple/infer",
        header + data,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200, response
    assert response["outputs"][0]["data"] == [2] * 16
    assert_still_serving(http_client)


def test_python_model_error_is_per_request(http_client):
    ok = np.array([1.0, 2.0], np.float32)
    result = http_client.infer("python_error", make_inputs([("INPUT0", ok)], True))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), ok * 2)
    err = infer_error(http_client, "python_error", make_inputs([("INPUT0", -ok)], True))
    assert "negative values are not allowed" in err.message()
    result = http_client.infer("python_error", make_inputs([("INPUT0", ok)], True))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), ok * 2)


def test_concurrent_clients(server):
    """Many requests in flight at once all come back right, on both backends."""
    import concurrent.futures

    def one(i: int) -> None:
        client = httpclient.InferenceServerClient(server.url)
        model, dtype = ("simple", np.int32) if i % 2 else ("add_sub", np.float32)
        for j in range(20):
            a = np.full((1, 16), i * 100 + j, dtype)
            b = np.full((1, 16), j, dtype)
            r = client.infer(model, make_inputs([("INPUT0", a), ("INPUT1", b)], True))
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
        client.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))


# --- classification extension ---------------------------------------------------------


def test_classification(http_client):
    scores = np.array([[0.1, 0.7, 0.2, 0.7, 0.05], [5.0, 1.0, 3.0, 4.0, 2.0]], np.float32)
    inp = httpclient.InferInput("INPUT0", [2, 5], "FP32")
    inp.set_data_from_numpy(scores, binary_data=True)
    for binary in (True, False):
        out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary, class_count=3)
        result = http_client.infer("classifier", [inp], outputs=[out])
        got = result.as_numpy("OUTPUT0")
        assert got.shape == (2, 3)
        rows = [[x.decode() if isinstance(x, bytes) else x for x in row] for row in got]
        # value:index:label, highest first, ties by lower index; index 4 has no label.
        assert rows[0] == ["0.700000:1:dog", "0.700000:3:fish", "0.200000:2:bird"]
        assert rows[1] == ["5.000000:0:cat", "4.000000:3:fish", "3.000000:2:bird"]
    # Without labels: value:index only; k larger than the classes returns them all.
    out = httpclient.InferRequestedOutput("OUTPUT0", class_count=10)
    result = http_client.infer("identity_fp32", [inp], outputs=[out])
    assert result.as_numpy("OUTPUT0").shape == (2, 5)
    assert result.as_numpy("OUTPUT0")[1][0] in (b"5.000000:0", "5.000000:0")


def test_classification_errors(http_client):
    inp = httpclient.InferInput("INPUT_BYTES", [1, 2], "BYTES")
    inp.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=object))
    others = []
    for t, np_type in ALL_TYPES:
        other = httpclient.InferInput(f"INPUT_{t}", [1, 1], t)
        other.set_data_from_numpy(np.zeros((1, 1), np_type))
        others.append(other)
    out = httpclient.InferRequestedOutput("OUTPUT_BYTES", class_count=2)
    err = infer_error(http_client, "identity_all", [inp, *others], outputs=[out])
    assert "classification is not possible on BYTES output 'OUTPUT_BYTES'" in err.message()
    assert_still_serving(http_client)
