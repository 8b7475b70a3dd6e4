"""Triton's gRPC protocol against real processes, driven by tritonclient.grpc (sync, aio
and streaming) and by a raw ``GRPCInferenceServiceStub`` for what tritonclient never
sends (typed ``contents``, malformed requests)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import ipaddress
import queue
import socket
import time
import uuid

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from test_http import ALL_TYPES, random_tensor
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, serialize_byte_tensor

from conftest import TRANSPORTS, DespinaServer


# Both transports of each protocol: lean HTTP + Despina's HTTP/2 gRPC, aiohttp + grpc.aio.
@pytest.fixture(scope="module", params=TRANSPORTS)
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


UNIMPLEMENTED = "StatusCode.UNIMPLEMENTED"
INVALID = "StatusCode.INVALID_ARGUMENT"
NOT_FOUND = "StatusCode.NOT_FOUND"


@pytest.fixture()
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture()
def stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def make_inputs(names_and_arrays):
    inputs = []
    for name, arr in names_and_arrays:
        inp = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def make_http_inputs(names_and_arrays):
    inputs = []
    for name, arr in names_and_arrays:
        inp = httpclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr, binary_data=True)
        inputs.append(inp)
    return inputs


def add_sub_inputs(a: np.ndarray, b: np.ndarray):
    return make_inputs([("INPUT0", a), ("INPUT1", b)])


def assert_still_serving(client):
    a = np.full((1, 16), 3, np.int32)
    result = client.infer("simple", make_inputs([("INPUT0", a), ("INPUT1", a)]))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)


def infer_error(client, model, inputs, **kw) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs, **kw)
    return info.value


# --- health and metadata ------------------------------------------------------------


def test_health(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("simple")
    assert client.is_model_ready("simple", "1")
    assert not client.is_model_ready("simple", "7")
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("broken_onnx")


def test_server_metadata(client, http_client):
    meta = client.get_server_metadata()
    http_meta = http_client.get_server_metadata()
    assert meta.name == "triton" == http_meta["name"]
    assert meta.version == http_meta["version"]
    assert list(meta.extensions) == http_meta["extensions"]
    assert client.get_server_metadata(as_json=True)["name"] == "triton"


def test_model_metadata(client, http_client):
    for model in ("simple", "add_sub", "identity_all"):
        meta = client.get_model_metadata(model, as_json=True)
        http_meta = http_client.get_model_metadata(model)
        assert meta["name"] == http_meta["name"] == model
        assert meta["versions"] == http_meta["versions"]
        assert meta["platform"] == http_meta["platform"]
        for kind in ("inputs", "outputs"):
            assert [
                {
                    "name": t["name"],
                    "datatype": t["datatype"],
                    "shape": [int(d) for d in t["shape"]],
                }
                for t in meta[kind]
            ] == http_meta[kind]
    meta = client.get_model_metadata("simple", "1")
    assert meta.inputs[0].name == "INPUT0"
    assert list(meta.inputs[0].shape) == [-1, 16]


def test_model_config(client, http_client):
    config = client.get_model_config("simple").config
    assert config.name == "simple"
    assert config.max_batch_size == 8
    assert config.input[0].data_type == grpcclient.model_config_pb2.TYPE_INT32
    assert list(config.input[0].dims) == [16]
    assert config.instance_group[0].count == 1
    assert config.instance_group[0].kind == grpcclient.model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert client.get_model_config("add_sub").config.backend == "python"
    as_json = client.get_model_config("simple", "1", as_json=True)["config"]
    http_config = http_client.get_model_config("simple")
    assert as_json["input"][0]["data_type"] == http_config["input"][0]["data_type"]
    assert as_json["instance_group"][0]["name"] == http_config["instance_group"][0]["name"]


def test_unknown_model_metadata_and_config(client, http_client):
    for call in (client.get_model_metadata, client.get_model_config):
        with pytest.raises(InferenceServerException) as info:
            call("no_such_model")
        assert info.value.status() == NOT_FOUND
        with pytest.raises(InferenceServerException) as http_info:
            http_client.get_model_metadata("no_such_model")
        assert info.value.message() == http_info.value.message()
        assert "no_such_model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("simple", "9")
    assert info.value.status() == NOT_FOUND
    assert "version 9" in info.value.message()


def test_repository_index(client, stub):
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["simple"].state == "READY"
    assert index["simple"].version == "1"
    assert index["broken_onnx"].state == "UNAVAILABLE"
    assert "onnxruntime could not load" in index["broken_onnx"].reason
    as_json = client.get_model_repository_index(as_json=True)
    assert {m["name"] for m in as_json["models"]} == set(index)
    ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    names = {m.name for m in ready.models}
    assert "simple" in names and "broken_onnx" not in names


def test_features_not_built_yet_answer_unimplemented(client):
    calls = [
        lambda: client.load_model("simple"),
        lambda: client.unload_model("simple"),
    ]
    for call in calls:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == UNIMPLEMENTED, info.value
        message = info.value.message()
        # Load / unload answer Triton's own words for model-control mode none.
        assert "not supported by Despina yet" in message or message.startswith(
            "explicit model load / unload is not allowed if polling is enabled"
        )
    assert_still_serving(client)


def test_trace_and_log_settings_answer_as_triton(client):
    """The trace and logging extensions answer (tests/e2e/test_trace.py and
    test_logging.py drive them); what they refuse ends the call, not the server."""
    trace = client.get_trace_settings(as_json=True)["settings"]
    assert trace["trace_level"] == {"value": ["OFF"]} and trace["trace_mode"] == {
        "value": ["triton"]
    }
    logs = client.get_log_settings(as_json=True)["settings"]
    assert logs["log_verbose_level"] == {"uint32_param": 0}
    with pytest.raises(InferenceServerException) as info:
        client.update_trace_settings(settings={"trace_rate": "0"})
    assert "trace_rate" in info.value.message()
    assert_still_serving(client)


@pytest.fixture()
def regions():
    """Makes client shared-memory regions and always destroys them."""
    made = []

    def make(byte_size: int):
        name = f"despina_grpc_{uuid.uuid4().hex[:8]}"
        handle = shm.create_shared_memory_region(name, "/" + name, byte_size)
        made.append(handle)
        return name, "/" + name, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def test_system_shared_memory(client, http_client, regions):
    """Register, status and unregister over gRPC; inputs read from and outputs written to
    the client's regions; the registry is the one HTTP sees."""
    client.unregister_system_shared_memory()
    try:
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.full((1, 16), 5, np.int32)
        in_name, in_key, in_handle = regions(2 * a.nbytes)
        shm.set_shared_memory_region(in_handle, [a, b])
        client.register_system_shared_memory(in_name, in_key, 2 * a.nbytes)
        out_name, out_key, out_handle = regions(2 * a.nbytes + 64)
        client.register_system_shared_memory(out_name, out_key, 2 * a.nbytes, offset=64)
        status = client.get_system_shared_memory_status().regions
        assert set(status) == {in_name, out_name}
        assert status[out_name].key == out_key
        assert status[out_name].offset == 64
        assert status[out_name].byte_size == 2 * a.nbytes
        only = client.get_system_shared_memory_status(in_name, as_json=True)["regions"]
        assert list(only) == [in_name]
        assert {r["name"] for r in http_client.get_system_shared_memory_status()} == {
            in_name,
            out_name,
        }

        inputs = []
        for i, input_name in enumerate(("INPUT0", "INPUT1")):
            inp = grpcclient.InferInput(input_name, [1, 16], "INT32")
            inp.set_shared_memory(in_name, a.nbytes, offset=i * a.nbytes)
            inputs.append(inp)
        outputs = []
        for i, output_name in enumerate(("OUTPUT0", "OUTPUT1")):
            out = grpcclient.InferRequestedOutput(output_name)
            out.set_shared_memory(out_name, a.nbytes, offset=i * a.nbytes)
            outputs.append(out)
        result = client.infer("simple", inputs, outputs=outputs)
        assert [o.name for o in result.get_response().outputs] == ["OUTPUT0", "OUTPUT1"]
        sums = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16], offset=64)
        diffs = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16], offset=64 + a.nbytes)
        np.testing.assert_array_equal(sums, a + b)
        np.testing.assert_array_equal(diffs, a - b)
        # Inputs in shared memory, outputs in the response.
        result = client.infer("simple", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)

        with pytest.raises(InferenceServerException) as info:
            client.register_system_shared_memory(in_name, in_key, 8)
        assert info.value.status() == "StatusCode.ALREADY_EXISTS"
        with pytest.raises(InferenceServerException) as info:
            client.register_system_shared_memory("nope", "/despina_no_such_key", 8)
        assert info.value.status() == INVALID
        assert info.value.message() == "Unable to open shared memory region: '/despina_no_such_key'"
        client.unregister_system_shared_memory(in_name)
        assert list(client.get_system_shared_memory_status().regions) == [out_name]
        err = infer_error(client, "simple", inputs)
        assert err.status() == INVALID
        assert f"Unable to find shared memory region: '{in_name}'" in err.message()
    finally:
        client.unregister_system_shared_memory()
    assert not client.get_system_shared_memory_status().regions
    assert_still_serving(client)


def test_cuda_shared_memory_answers_clearly_without_a_gpu(client):
    assert not client.get_cuda_shared_memory_status().regions
    with pytest.raises(InferenceServerException) as info:
        client.register_cuda_shared_memory("gpu0", b"\0" * 64, 0, 64)
    assert info.value.status() == UNIMPLEMENTED
    assert "NVIDIA GPU" in info.value.message()
    client.unregister_cuda_shared_memory()


# --- inference ---------------------------------------------------------------------


@pytest.mark.parametrize("model,dtype", [("simple", np.int32), ("add_sub", np.float32)])
def test_add_sub_models(client, model, dtype):
    rng = np.random.default_rng(0)
    a = rng.integers(-100, 100, size=(3, 16)).astype(dtype)
    b = rng.integers(-100, 100, size=(3, 16)).astype(dtype)
    result = client.infer(
        model,
        add_sub_inputs(a, b),
        outputs=[grpcclient.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")],
        request_id="req-42",
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response.id == "req-42"
    assert response.model_name == model
    assert response.model_version == "1"
    assert len(response.raw_output_contents) == 2


def test_repeated_requests_each_get_their_own_data(client):
    """Requests that repeat the same fields but their tensor bytes are rebuilt from the
    servicer's RequestMemo: each is answered from its own bytes, and a request with the
    same fields for another batch size is decoded and checked anew."""
    rng = np.random.default_rng(3)
    for _ in range(4):
        a, b = (rng.integers(-1000, 1000, size=(1, 16)).astype(np.int32) for _ in range(2))
        result = client.infer("simple", add_sub_inputs(a, b))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    a = np.zeros((9, 16), np.int32)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", add_sub_inputs(a, a))
    assert "batch-size must be <= 8" in info.value.message()


def test_requested_output_subset_and_version(client):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    result = client.infer(
        "simple",
        make_inputs([("INPUT0", a), ("INPUT1", a)]),
        outputs=[grpcclient.InferRequestedOutput("OUTPUT1")],
        model_version="1",
    )
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((1, 16), np.int32))
    assert result.as_numpy("OUTPUT0") is None


def every_type_tensors():
    tensors = [
        (f"INPUT_{t}", random_tensor(np_type, (2, 5), i))
        for i, (t, np_type) in enumerate(ALL_TYPES)
    ]
    tensors.append(
        (
            "INPUT_BYTES",
            np.array(
                [[b"a", b"bc", b"", "h\u00e9llo w\u00f6rld".encode(), b"n\x00z"]] * 2,
                dtype=object,
            ),
        )
    )
    return tensors


def test_every_data_type(client):
    """One request carries a tensor of every type the ONNX model accepts, extremes included."""
    tensors = every_type_tensors()
    result = client.infer(
        "identity_all",
        make_inputs(tensors),
        outputs=[grpcclient.InferRequestedOutput(n.replace("INPUT", "OUTPUT")) for n, _ in tensors],
    )
    for name, data in tensors:
        out = result.as_numpy(name.replace("INPUT", "OUTPUT"))
        assert out.dtype == data.dtype, name
        assert out.shape == data.shape, name
        np.testing.assert_array_equal(out, data, err_msg=name)


def test_bytes_tensors(client):
    a = np.array([[str(i) for i in range(16)]], dtype=object)
    b = np.array([["1"] * 16], dtype=object)
    result = client.infer("simple_string", make_inputs([("INPUT0", a), ("INPUT1", b)]))
    assert [int(x) for x in result.as_numpy("OUTPUT0").reshape(-1)] == [i + 1 for i in range(16)]
    assert [int(x) for x in result.as_numpy("OUTPUT1").reshape(-1)] == [i - 1 for i in range(16)]


def test_classification(client):
    scores = np.array([[0.1, 0.7, 0.2, 0.7, 0.05], [5.0, 1.0, 3.0, 4.0, 2.0]], np.float32)
    out = grpcclient.InferRequestedOutput("OUTPUT0", class_count=3)
    result = client.infer("classifier", make_inputs([("INPUT0", scores)]), outputs=[out])
    rows = [[x.decode() for x in row] for row in result.as_numpy("OUTPUT0")]
    assert rows[0] == ["0.700000:1:dog", "0.700000:3:fish", "0.200000:2:bird"]
    assert rows[1] == ["5.000000:0:cat", "4.000000:3:fish", "3.000000:2:bird"]


def test_variable_dims_and_large_tensor(client):
    """A 4 MiB tensor (past gRPC's default 4 MiB message limit) goes through the arena."""
    for n in (1, 7, 1 << 20):
        data = np.random.default_rng(n).standard_normal((1, n)).astype(np.float32)
        result = client.infer("identity_fp32", make_inputs([("INPUT0", data)]))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_parameters_pass_through(client, stub):
    a = np.ones((1, 16), np.int32)
    result = client.infer(
        "simple",
        make_inputs([("INPUT0", a), ("INPUT1", a)]),
        parameters={"my_key": "v", "n": 3, "f": 0.5, "b": True},
        priority=1,
        timeout=10_000_000,
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), 0 * a)
    ok = a.tobytes()
    bad = [
        ("triton_x", "bool_param", True, "reserved for Triton usage"),
        ("sequence_start", "int64_param", 1, "unable to parse 'sequence_start'"),
        ("priority", "int64_param", -1, "unable to parse 'priority'"),
        ("unset", None, None, "parameter 'unset' has no value"),
    ]
    for key, kind, value, message in bad:
        request = raw_request(
            "simple", [("INPUT0", "INT32", [1, 16], ok), ("INPUT1", "INT32", [1, 16], ok)]
        )
        param = request.parameters[key]
        if kind is not None:
            setattr(param, kind, value)
        err = stub_error(stub.ModelInfer, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, key
        assert message in err.details(), (message, err.details())


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request(client, algorithm):
    a = np.arange(4096, dtype=np.float32).reshape(1, 4096)
    result = client.infer(
        "identity_fp32", make_inputs([("INPUT0", a)]), compression_algorithm=algorithm
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a)


def test_aio_client(server):
    async def main() -> None:
        client = aioclient.InferenceServerClient(server.grpc_url)
        try:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready("add_sub")
            assert (await client.get_server_metadata()).name == "triton"
            assert (await client.get_model_config("simple")).config.max_batch_size == 8

            async def one(i: int) -> None:
                a = np.full((1, 16), i, np.float32)
                b = np.ones((1, 16), np.float32)
                inputs = []
                for name, arr in (("INPUT0", a), ("INPUT1", b)):
                    inp = aioclient.InferInput(name, [1, 16], "FP32")
                    inp.set_data_from_numpy(arr)
                    inputs.append(inp)
                result = await client.infer("add_sub", inputs, request_id=str(i))
                assert result.get_response().id == str(i)
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)

            await asyncio.gather(*(one(i) for i in range(64)))
            with pytest.raises(InferenceServerException) as info:
                await client.get_model_metadata("nope")
            assert info.value.status() == NOT_FOUND
        finally:
            await client.close()

    asyncio.run(main())


# --- streaming ----------------------------------------------------------------------


def test_stream_many_in_flight_ids_matched(server):
    """100 requests in flight on one stream: a slow one first does not hold up the rest,
    every response carries its request's id, and errors come back on the stream."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        slow = grpcclient.InferInput("SLEEP_MS", [1], "INT32")
        slow.set_data_from_numpy(np.array([1500], np.int32))
        client.async_stream_infer("slow", [slow], request_id="slow")
        sent = {}
        for i in range(100):
            model, dtype = ("simple", np.int32) if i % 2 else ("add_sub", np.float32)
            a = np.full((1, 16), i, dtype)
            b = np.arange(16, dtype=dtype).reshape(1, 16)
            client.async_stream_infer(
                model, add_sub_inputs(a, b), request_id=f"r{i}", model_version="1"
            )
            sent[f"r{i}"] = (a, b)
        bad = np.ones((1, 15), np.int32)
        client.async_stream_infer("simple", make_inputs([("INPUT0", bad), ("INPUT1", bad)]))
        client.async_stream_infer("nope", make_inputs([("INPUT0", bad)]))
        order, errors = [], []
        for _ in range(103):
            result, error = results.get(timeout=60)
            if error is not None:
                errors.append(error.message())
                continue
            rid = result.get_response().id
            order.append(rid)
            if rid == "slow":
                assert result.as_numpy("SLEPT_MS")[0] == 1500
                continue
            a, b = sent.pop(rid)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        assert not sent
        assert order[-1] == "slow", "the slow request held up the stream"
        assert len(errors) == 2
        assert any("unexpected shape for input 'INPUT0'" in e for e in errors)
        assert any("Request for unknown model: 'nope' is not found" in e for e in errors)
        # The stream is still open after errors.
        a = np.ones((1, 16), np.int32)
        client.async_stream_infer("simple", make_inputs([("INPUT0", a), ("INPUT1", a)]))
        result, error = results.get(timeout=30)
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)
    finally:
        client.stop_stream()
        client.close()


def test_stream_final_response_flag(server):
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        a = np.ones((1, 16), np.int32)
        client.async_stream_infer(
            "simple",
            make_inputs([("INPUT0", a), ("INPUT1", a)]),
            request_id="f",
            enable_empty_final_response=True,
        )
        result, error = results.get(timeout=30)
        assert error is None
        response = result.get_response()
        assert response.id == "f"
        assert response.parameters["triton_final_response"].bool_param
    finally:
        client.stop_stream()
        client.close()


def test_aio_stream(server):
    async def main() -> None:
        client = aioclient.InferenceServerClient(server.grpc_url)

        async def requests():
            for i in range(100):
                a = np.full((1, 16), i, np.int32)
                inputs = []
                for name in ("INPUT0", "INPUT1"):
                    inp = aioclient.InferInput(name, [1, 16], "INT32")
                    inp.set_data_from_numpy(a)
                    inputs.append(inp)
                yield {"model_name": "simple", "inputs": inputs, "request_id": f"a{i}"}

        seen = set()
        try:
            async for result, error in client.stream_infer(requests()):
                assert error is None, error
                rid = result.get_response().id
                i = int(rid[1:])
                np.testing.assert_array_equal(
                    result.as_numpy("OUTPUT0"), np.full((1, 16), 2 * i, np.int32)
                )
                seen.add(rid)
                if len(seen) == 100:
                    break
        finally:
            await client.close()
        assert seen == {f"a{i}" for i in range(100)}

    asyncio.run(main())


# --- errors: the right status and the same message as HTTP -------------------------------


def same_error_both_ways(client, http_client, model, arrays, **kw) -> InferenceServerException:
    err = infer_error(client, model, make_inputs(arrays), **kw)
    http_kw = dict(kw)
    if "outputs" in http_kw:
        http_kw["outputs"] = [httpclient.InferRequestedOutput(o.name()) for o in kw["outputs"]]
    http_err = infer_error(http_client, model, make_http_inputs(arrays), **http_kw)
    assert err.message() == http_err.message()
    return err


def test_unknown_model_and_version(client, http_client):
    a = np.ones((1, 16), np.int32)
    err = same_error_both_ways(client, http_client, "nope", [("INPUT0", a)])
    assert err.status() == NOT_FOUND
    assert "Request for unknown model: 'nope' is not found" in err.message()
    err = same_error_both_ways(
        client, http_client, "simple", [("INPUT0", a), ("INPUT1", a)], model_version="9"
    )
    assert err.status() == NOT_FOUND
    assert "version 9" in err.message()
    assert_still_serving(client)


@pytest.mark.parametrize("model", ["simple", "add_sub"])
def test_wrong_shape(client, http_client, model):
    dtype = np.int32 if model == "simple" else np.float32
    a = np.ones((1, 15), dtype)
    err = same_error_both_ways(client, http_client, model, [("INPUT0", a), ("INPUT1", a)])
    assert err.status() == INVALID
    assert "unexpected shape for input 'INPUT0'" in err.message()
    assert "Expected [-1,16], got [1,15]" in err.message()
    too_big = np.ones((9, 16), dtype)
    err = same_error_both_ways(
        client, http_client, model, [("INPUT0", too_big), ("INPUT1", too_big)]
    )
    assert "batch-size must be <= 8" in err.message()
    assert_still_serving(client)


@pytest.mark.parametrize(
    "model,right,wrong", [("simple", "INT32", np.float32), ("add_sub", "FP32", np.int32)]
)
def test_wrong_dtype(client, http_client, model, right, wrong):
    a = np.ones((1, 16), wrong)
    err = same_error_both_ways(client, http_client, model, [("INPUT0", a), ("INPUT1", a)])
    assert err.status() == INVALID
    assert f"expects '{right}'" in err.message()
    assert "INPUT0" in err.message()
    assert_still_serving(client)


@pytest.mark.parametrize("model,dtype", [("simple", np.int32), ("add_sub", np.float32)])
def test_missing_input(client, http_client, model, dtype):
    a = np.ones((1, 16), dtype)
    err = same_error_both_ways(client, http_client, model, [("INPUT0", a)])
    assert err.status() == INVALID
    assert "missing required input(s) ['INPUT1']" in err.message()
    assert_still_serving(client)


def test_unexpected_input_and_output(client, http_client):
    a = np.ones((1, 16), np.int32)
    err = same_error_both_ways(
        client, http_client, "simple", [("INPUT0", a), ("INPUT1", a), ("EXTRA", a)]
    )
    assert "unexpected inference input 'EXTRA'" in err.message()
    err = same_error_both_ways(
        client,
        http_client,
        "simple",
        [("INPUT0", a), ("INPUT1", a)],
        outputs=[grpcclient.InferRequestedOutput("NOPE")],
    )
    assert "unexpected inference output 'NOPE'" in err.message()


def test_python_model_error_is_per_request(client):
    ok = np.array([1.0, 2.0], np.float32)
    result = client.infer("python_error", make_inputs([("INPUT0", ok)]))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), ok * 2)
    err = infer_error(client, "python_error", make_inputs([("INPUT0", -ok)]))
    assert "negative values are not allowed" in err.message()
    result = client.infer("python_error", make_inputs([("INPUT0", ok)]))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), ok * 2)


def raw_request(model: str, tensors, **kw) -> pb.ModelInferRequest:
    """A request with raw_input_contents: tensors are (name, datatype, shape, bytes)."""
    request = pb.ModelInferRequest(model_name=model, **kw)
    for name, datatype, shape, data in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(data)
    return request


def stub_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value


def test_raw_contents_checked(stub, client):
    ok = np.ones(16, np.int32).tobytes()
    cases = [
        (
            raw_request(
                "simple", [("INPUT0", "INT32", [1, 16], ok[:-4]), ("INPUT1", "INT32", [1, 16], ok)]
            ),
            "unexpected total byte size 60 for input 'INPUT0', expecting 64",
        ),
        (
            raw_request(
                "simple", [("INPUT0", "INT32", [1, 16], ok), ("INPUT1", "INT32", [1, 16], ok)]
            ),
            None,
        ),
        (
            raw_request("simple", [("INPUT0", "INT32", [1, 16], ok)]),
            "missing required input(s) ['INPUT1']",
        ),
        (
            raw_request("simple", [("INPUT0", "NOPE", [1, 16], ok)]),
            "input 'INPUT0' has unknown datatype 'NOPE'",
        ),
        (
            raw_request("simple", [("INPUT0", "INT32", [1, -16], ok)]),
            "dimensions must be non-negative",
        ),
        (
            raw_request("simple_string", [("INPUT0", "BYTES", [1, 2], b"\x05\x00\x00\x00ab")]),
            "malformed BYTES data for input 'INPUT0'",
        ),
        (
            raw_request("simple_string", [("INPUT0", "BYTES", [1, 2], b"\x01\x00\x00\x00a")]),
            "unexpected number of string elements 1 for input 'INPUT0', expecting 2",
        ),
    ]
    extra = raw_request(
        "simple", [("INPUT0", "INT32", [1, 16], ok), ("INPUT1", "INT32", [1, 16], ok)]
    )
    extra.raw_input_contents.append(ok)
    cases.append((extra, "raw_input_contents holds 3 entries but the request's inputs use 2"))
    missing = raw_request("simple", [("INPUT0", "INT32", [1, 16], ok)])
    missing.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
    cases.append((missing, "input 'INPUT1' has no data"))
    both = raw_request(
        "simple", [("INPUT0", "INT32", [1, 16], ok), ("INPUT1", "INT32", [1, 16], ok)]
    )
    both.inputs[1].contents.int_contents.extend([1] * 16)  # and its raw entry too
    cases.append((both, "raw_input_contents holds 2 entries but the request's inputs use 1"))
    for request, message in cases:
        if message is None:
            response = stub.ModelInfer(request, timeout=30)
            assert np.frombuffer(response.raw_output_contents[0], np.int32).tolist() == [2] * 16
            continue
        err = stub_error(stub.ModelInfer, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, err)
        assert message in err.details(), (message, err.details())
    assert_still_serving(client)


TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def test_typed_contents(stub):
    """Every type sent as typed ``contents`` (what KServe clients other than tritonclient
    send), except FP16, which has no typed field and rides raw_input_contents in the same
    request; outputs come back as raw_output_contents."""
    tensors = every_type_tensors()
    request = pb.ModelInferRequest(model_name="identity_all", id="typed")
    for name, data in tensors:
        datatype = name[len("INPUT_") :]
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(data.shape))
        if datatype == "FP16":
            request.raw_input_contents.append(data.tobytes())
        else:
            getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(data.reshape(-1).tolist())
        request.outputs.add(name=name.replace("INPUT", "OUTPUT"))
    response = stub.ModelInfer(request, timeout=30)
    assert response.id == "typed"
    assert len(response.raw_output_contents) == len(tensors)
    got = {o.name: (o, raw) for o, raw in zip(response.outputs, response.raw_output_contents)}
    for name, data in tensors:
        out, raw = got[name.replace("INPUT", "OUTPUT")]
        assert list(out.shape) == list(data.shape)
        if data.dtype == np.object_:
            assert raw == serialize_byte_tensor(data).item()
        else:
            np.testing.assert_array_equal(
                np.frombuffer(raw, data.dtype).reshape(data.shape), data, err_msg=name
            )


def test_typed_contents_checked(stub):
    def one(datatype, field, values, shape):
        request = pb.ModelInferRequest(model_name="identity_all")
        tensor = request.inputs.add(name=f"INPUT_{datatype}", datatype=datatype, shape=shape)
        if field:
            getattr(tensor.contents, field).extend(values)
        return request

    cases = [
        (one("FP16", "fp32_contents", [1.0], [1, 1]), "has no typed 'contents' field"),
        (
            one("FP32", "fp32_contents", [1.0, 2.0], [1, 3]),
            "expected 3 (shape [1,3]) in 'contents.fp32_contents', got 2",
        ),
        (one("FP32", "int_contents", [1, 2], [1, 2]), "in 'contents.fp32_contents', got 0"),
        (one("INT8", "int_contents", [1, 300], [1, 2]), "INT8 elements must be integers from"),
        (one("UINT16", "uint_contents", [70000], [1, 1]), "UINT16 elements must be integers"),
    ]
    for request, message in cases:
        err = stub_error(stub.ModelInfer, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.details(), (message, err.details())


def test_malformed_protobuf(server, client):
    """Bytes that are no ModelInferRequest fail that call; the server keeps serving."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12" + b"\xff" * 11):
            with pytest.raises(grpc.RpcError) as info:
                call(garbage, timeout=30)
            assert info.value.code() != grpc.StatusCode.OK
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError):
            list(stream(iter([b"\xff\xff\xff\xff"]), timeout=30))
    assert_still_serving(client)


def test_http_and_grpc_at_once(server):
    """HTTP and gRPC clients on one server at the same time, on both backends."""

    def one(i: int) -> None:
        use_grpc = i % 2 == 0
        client = (
            grpcclient.InferenceServerClient(server.grpc_url)
            if use_grpc
            else httpclient.InferenceServerClient(server.url)
        )
        model, dtype = ("simple", np.int32) if i % 4 < 2 else ("add_sub", np.float32)
        for j in range(20):
            a = np.full((1, 16), i * 100 + j, dtype)
            b = np.full((1, 16), j, dtype)
            pairs = [("INPUT0", a), ("INPUT1", b)]
            inputs = make_inputs(pairs) if use_grpc else make_http_inputs(pairs)
            r = client.infer(model, inputs, request_id=f"{i}-{j}")
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
        client.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))


# --- flags: TLS, one protocol at a time, several frontends -----------------------------


def make_certificates(folder):
    """A CA, and a server and a client certificate it signs (localhost and 127.0.0.1)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key, cert) -> None:
        (folder / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("despina test CA"))
        .issuer_name(name("despina test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca_key, ca)
    for stem in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"despina test {stem}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        write(stem, key, cert)


def wait_for_log(srv: DespinaServer, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert srv.proc is not None
        if srv.proc.poll() is not None:
            raise RuntimeError(f"despina serve exited with {srv.proc.returncode}:\n{srv.log()}")
        if text in srv.log():
            return
        time.sleep(0.1)
    raise TimeoutError(f"'{text}' not in the log after {timeout}s:\n{srv.log()}")


def wait_model_ready(client, model: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.is_model_ready(model):
                return
        except InferenceServerException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{model} not ready over gRPC in {timeout}s")


def tls_infer(client) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    result = client.infer(
        "simple", make_inputs([("INPUT0", a), ("INPUT1", a)]), compression_algorithm="gzip"
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_tls(tmp_path, repository, mutual):
    make_certificates(tmp_path)
    flags = [
        f"--grpc-server-cert={tmp_path / 'server.crt'}",
        f"--grpc-server-key={tmp_path / 'server.key'}",
        # Triton's spellings: "medium" (not "med") and "high"
        f"--grpc-infer-response-compression-level={'high' if mutual else 'medium'}",
        "--grpc-keepalive-time=10000",
        "--grpc-keepalive-timeout=5000",
        "--grpc-keepalive-permit-without-calls=true",
        "--grpc-http2-max-pings-without-data=0",
        "--grpc-http2-min-recv-ping-interval-without-data=5000",
        "--grpc-http2-max-ping-strikes=3",
        "--grpc-infer-allocation-pool-size=16",
    ]
    if mutual:
        flags += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={tmp_path / 'ca.crt'}"]
    else:
        flags += ["--grpc-use-ssl=true"]
    srv = DespinaServer(repository, tmp_path / "serve.log", flags).start()
    try:
        url = f"localhost:{srv.grpc_port}"
        kw = {"root_certificates": str(tmp_path / "ca.crt")}
        if mutual:
            kw |= {
                "private_key": str(tmp_path / "client.key"),
                "certificate_chain": str(tmp_path / "client.crt"),
            }
        client = grpcclient.InferenceServerClient(url, ssl=True, **kw)
        wait_model_ready(client, "simple")
        assert client.get_server_metadata().name == "triton"
        tls_infer(client)
        # grpc.aio serves TLS: statuses and streams through its context, not h2server's.
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("no_such_model")
        assert info.value.status() == NOT_FOUND
        assert "no_such_model" in info.value.message()
        # The statistics extension through grpc.aio's servicer too: off by default
        # (--allow-metrics=false), refused with the flag named, not answered with zeros.
        with pytest.raises(InferenceServerException) as info:
            client.get_inference_statistics("simple")
        assert info.value.status() == "StatusCode.UNIMPLEMENTED"
        assert "--allow-metrics=true" in info.value.message()
        results: queue.Queue = queue.Queue()
        client.start_stream(lambda result, error: results.put((result, error)))
        a = np.full((1, 16), 3, np.int32)
        client.async_stream_infer("simple", make_inputs([("INPUT0", a), ("INPUT1", a)]))
        client.async_stream_infer("simple", make_inputs([("INPUT0", a)]), request_id="bad")
        outcomes = [results.get(timeout=30) for _ in range(2)]
        client.stop_stream()
        ok = [r for r, e in outcomes if e is None]
        failed = [e for r, e in outcomes if e is not None]
        assert len(ok) == 1 and len(failed) == 1, outcomes
        np.testing.assert_array_equal(ok[0].as_numpy("OUTPUT0"), 2 * a)
        assert "INPUT1" in failed[0].message()
        client.close()
        plain = grpcclient.InferenceServerClient(srv.grpc_url)
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=5)
        plain.close()
        if mutual:
            anonymous = grpcclient.InferenceServerClient(
                url, ssl=True, root_certificates=str(tmp_path / "ca.crt")
            )
            with pytest.raises(InferenceServerException):
                anonymous.is_server_live(client_timeout=5)
            anonymous.close()
        assert f"Started GRPCInferenceService at 0.0.0.0:{srv.grpc_port}" in srv.log()
    finally:
        assert srv.stop() == 0


def test_bad_tls_settings_fail_clearly(tmp_path, repository):
    srv = DespinaServer(
        repository, tmp_path / "serve.log", ["--grpc-use-ssl=true", "--grpc-server-cert=/nope"]
    ).start(wait_ready=False)
    try:
        assert srv.proc.wait(60) == 1
        assert "--grpc-use-ssl needs --grpc-server-key" in srv.log()
    finally:
        srv.stop()


def test_grpc_only_with_two_frontends(tmp_path, repository):
    """--allow-http=false: gRPC alone, on a port two frontends share (SO_REUSEPORT)."""
    srv = DespinaServer(
        repository, tmp_path / "serve.log", ["--allow-http=false", "--frontends=2"]
    ).start(wait_ready=False)
    try:
        wait_for_log(srv, "Despina is ready: gRPC on 0.0.0.0:")
        assert srv.log().count(f"Started GRPCInferenceService at 0.0.0.0:{srv.grpc_port}") == 2
        assert "Started HTTPService" not in srv.log()
        for _ in range(4):  # new connections, spread by the kernel over both frontends
            client = grpcclient.InferenceServerClient(srv.grpc_url)
            assert_still_serving(client)
            client.close()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", srv.http_port)) != 0
    finally:
        assert srv.stop() == 0


def test_allow_grpc_false(tmp_path, repository):
    srv = DespinaServer(repository, tmp_path / "serve.log", ["--allow-grpc=false"]).start()
    try:
        assert "Started GRPCInferenceService" not in srv.log()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", srv.grpc_port)) != 0
    finally:
        assert srv.stop() == 0
