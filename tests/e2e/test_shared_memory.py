"""Triton's system shared-memory extension over HTTP, with tritonclient's own
shared-memory utilities as the client: inputs read in place, outputs written straight
into the client's region, and every error case answered without harming the server."""

from __future__ import annotations

import json
import os
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from conftest import TRANSPORTS


# Both transports of each protocol: lean HTTP + Despina's HTTP/2 gRPC, aiohttp + grpc.aio.
@pytest.fixture(scope="module", params=TRANSPORTS)
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture()
def client(server):
    c = httpclient.InferenceServerClient(server.url, network_timeout=120)
    c.unregister_system_shared_memory()
    yield c
    c.unregister_system_shared_memory()
    c.close()


def simple_inputs_in_shm(client, regions, a, b):
    nbytes = a.nbytes
    name, key, handle = regions(2 * nbytes)
    shm.set_shared_memory_region(handle, [a, b])
    client.register_system_shared_memory(name, key, 2 * nbytes)
    inputs = []
    for i, input_name in enumerate(("INPUT0", "INPUT1")):
        inp = httpclient.InferInput(input_name, list(a.shape), "INT32")
        inp.set_shared_memory(name, nbytes, offset=i * nbytes)
        inputs.append(inp)
    return name, inputs


def test_register_status_unregister(client, regions):
    name, key, _ = regions(1024)
    client.register_system_shared_memory(name, key, 512, offset=256)
    status = client.get_system_shared_memory_status()
    assert status == [{"name": name, "key": key, "offset": 256, "byte_size": 512}]
    assert client.get_system_shared_memory_status(name) == status
    other, other_key, _ = regions(64)
    client.register_system_shared_memory(other, other_key, 64)
    assert {r["name"] for r in client.get_system_shared_memory_status()} == {name, other}
    client.unregister_system_shared_memory(name)
    assert [r["name"] for r in client.get_system_shared_memory_status()] == [other]
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []


def test_inputs_and_outputs_in_shared_memory(client, regions):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 5, np.int32)
    _, inputs = simple_inputs_in_shm(client, regions, a, b)
    out_name, out_key, out_handle = regions(2 * a.nbytes)
    client.register_system_shared_memory(out_name, out_key, 2 * a.nbytes)
    outputs = []
    for i, output_name in enumerate(("OUTPUT0", "OUTPUT1")):
        out = httpclient.InferRequestedOutput(output_name, binary_data=True)
        out.set_shared_memory(out_name, a.nbytes, offset=i * a.nbytes)
        outputs.append(out)
    result = client.infer("simple", inputs, outputs=outputs)
    meta0 = result.get_output("OUTPUT0")
    assert meta0["shape"] == [1, 16] and meta0["datatype"] == "INT32"
    # The bytes are in the region, not in the body.
    assert "data" not in meta0 and "binary_data_size" not in meta0.get("parameters", {})
    sums = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16], offset=0)
    diffs = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16], offset=a.nbytes)
    np.testing.assert_array_equal(sums, a + b)
    np.testing.assert_array_equal(diffs, a - b)


def mappings_of(server, key: str) -> dict[int, list[str]]:
    """pid -> the permissions of each of its mappings of ``key``, over the server's
    processes that map it."""
    found: dict[int, list[str]] = {}
    for pid in server.child_pids(""):
        try:
            with open(f"/proc/{pid}/maps") as f:
                perms = [line.split()[1] for line in f if line.rstrip().endswith(f"/dev/shm{key}")]
        except OSError:
            continue
        if perms:
            found[pid] = perms
    return found


@pytest.mark.parametrize(
    ("model", "datatype"), [("simple", np.int32), ("add_sub", np.float32)], ids=["onnx", "python"]
)
def test_input_regions_are_mapped_read_only(server, client, regions, model, datatype):
    """Region A holds only inputs, region B only outputs: the backend host maps A
    read-only and writes B through a descriptor (pwrite), and no other process maps either."""
    a = np.arange(16, dtype=datatype).reshape(1, 16)
    b = np.full((1, 16), 3, datatype)
    in_name, in_key, in_handle = regions(2 * a.nbytes)
    out_name, out_key, out_handle = regions(2 * a.nbytes)
    shm.set_shared_memory_region(in_handle, [a, b])
    client.register_system_shared_memory(in_name, in_key, 2 * a.nbytes)
    client.register_system_shared_memory(out_name, out_key, 2 * a.nbytes)
    triton_type = "INT32" if datatype == np.int32 else "FP32"
    inputs, outputs = [], []
    for i in range(2):
        inp = httpclient.InferInput(f"INPUT{i}", [1, 16], triton_type)
        inp.set_shared_memory(in_name, a.nbytes, offset=i * a.nbytes)
        inputs.append(inp)
        out = httpclient.InferRequestedOutput(f"OUTPUT{i}", binary_data=True)
        out.set_shared_memory(out_name, a.nbytes, offset=i * a.nbytes)
        outputs.append(out)
    client.infer(model, inputs, outputs=outputs)
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(out_handle, datatype, [1, 16], offset=a.nbytes), a - b
    )
    readers, writers = mappings_of(server, in_key), mappings_of(server, out_key)
    assert readers and all(perms == ["r--s"] for perms in readers.values()), readers
    # Outputs are written with pwrite (a shrunk region cannot SIGBUS a write): the output
    # region is not mapped at all, only open for writing in the process that reads A.
    assert writers == {}, writers
    assert writers_of(server, out_key) == list(readers)


def writers_of(server, key: str) -> list[int]:
    """The server's processes that hold ``key`` open for writing."""
    found = []
    for pid in server.child_pids(""):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") != f"/dev/shm{key}":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    flags = int(f.read().split("flags:")[1].split()[0], 8)
                if flags & os.O_ACCMODE == os.O_RDWR:
                    found.append(pid)
        except OSError:
            continue
    return found


def test_shm_inputs_with_body_outputs_and_python_model(client, regions):
    a = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)
    name, key, handle = regions(2 * a.nbytes)
    shm.set_shared_memory_region(handle, [a, 2 * a])
    client.register_system_shared_memory(name, key, 2 * a.nbytes)
    inputs = []
    for i, input_name in enumerate(("INPUT0", "INPUT1")):
        inp = httpclient.InferInput(input_name, [1, 16], "FP32")
        inp.set_shared_memory(name, a.nbytes, offset=i * a.nbytes)
        inputs.append(inp)
    result = client.infer("add_sub", inputs)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), 3 * a)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), -a)


def test_bytes_tensors_in_shared_memory(client, regions):
    a = np.array([[str(i) for i in range(16)]], dtype=object)
    b = np.array([["2"] * 16], dtype=object)
    sa, sb = serialize_byte_tensor(a), serialize_byte_tensor(b)
    size_a, size_b = len(sa.item()), len(sb.item())
    name, key, handle = regions(size_a + size_b)
    shm.set_shared_memory_region(handle, [sa, sb])
    client.register_system_shared_memory(name, key, size_a + size_b)
    out_name, out_key, out_handle = regions(1024)
    client.register_system_shared_memory(out_name, out_key, 1024)
    in0 = httpclient.InferInput("INPUT0", [1, 16], "BYTES")
    in0.set_shared_memory(name, size_a)
    in1 = httpclient.InferInput("INPUT1", [1, 16], "BYTES")
    in1.set_shared_memory(name, size_b, offset=size_a)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
    out.set_shared_memory(out_name, 1024)
    client.infer("simple_string", [in0, in1], outputs=[out])
    got = shm.get_contents_as_numpy(out_handle, np.object_, [1, 16])
    assert [int(x) for x in got.reshape(-1)] == [i + 2 for i in range(16)]


def test_large_tensor_through_shared_memory(client, regions):
    """256 MiB in and out through the client's regions, read and written in place."""
    n = 64 * 1024 * 1024
    data = np.random.default_rng(0).standard_normal((1, n)).astype(np.float32)
    in_name, in_key, in_handle = regions(data.nbytes)
    out_name, out_key, out_handle = regions(data.nbytes)
    shm.set_shared_memory_region(in_handle, [data])
    client.register_system_shared_memory(in_name, in_key, data.nbytes)
    client.register_system_shared_memory(out_name, out_key, data.nbytes)
    inp = httpclient.InferInput("INPUT0", [1, n], "FP32")
    inp.set_shared_memory(in_name, data.nbytes)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
    out.set_shared_memory(out_name, data.nbytes)
    client.infer("identity_fp32", [inp], outputs=[out])
    result = shm.get_contents_as_numpy(out_handle, np.float32, [1, n])
    assert np.array_equal(result, data)


# --- errors --------------------------------------------------------------------------------


def status_and_error(exc: InferenceServerException) -> tuple[str, str]:
    return exc.status(), exc.message()


def test_registration_errors(client, regions):
    name, key, _ = regions(128)
    client.register_system_shared_memory(name, key, 128)
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory(name, key, 128)
    assert "already in manager" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory("missing", "/despina_no_such_object", 64)
    assert info.value.status() == "400"
    # One message for every unusable key (issue #12): no oracle for what exists.
    assert info.value.message() == "Unable to open shared memory region: '/despina_no_such_object'"
    # A region past the end of an object the client may register: Triton's words.
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory("too_big", key, 4096)
    assert info.value.message().startswith(
        "failed to register shared memory region 'too_big': invalid args"
    )
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory("bad_offset", key, 64, offset=100)
    assert info.value.message().startswith(
        "failed to register shared memory region 'bad_offset': invalid args"
    )
    with pytest.raises(InferenceServerException) as info:
        client.get_system_shared_memory_status("never_registered")
    assert info.value.status() == "404"
    assert client.get_system_shared_memory_status(name)[0]["byte_size"] == 128


@pytest.mark.parametrize("key", ["../../etc/passwd", "/../etc/passwd", "a/b", "..", ""])
def test_keys_cannot_escape_dev_shm(server, client, key):
    body = json.dumps({"key": key, "offset": 0, "byte_size": 8}).encode()
    request = urllib.request.Request(
        f"http://{server.url}/v2/systemsharedmemory/region/evil/register", data=body, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    message = json.loads(info.value.read())["error"]
    assert message == f"Unable to open shared memory region: '{key}'"
    assert client.get_system_shared_memory_status() == []


def test_infer_errors(client, regions, server):
    a = np.ones((1, 16), np.int32)
    name, inputs = simple_inputs_in_shm(client, regions, a, a)
    # Offset + size past the region.
    bad = httpclient.InferInput("INPUT1", [1, 16], "INT32")
    bad.set_shared_memory(name, a.nbytes, offset=a.nbytes + 4)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", [inputs[0], bad])
    assert info.value.status() == "400"
    assert "Invalid offset + byte size" in info.value.message()
    # Unknown region.
    ghost = httpclient.InferInput("INPUT1", [1, 16], "INT32")
    ghost.set_shared_memory("ghost_region", a.nbytes)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", [inputs[0], ghost])
    assert "Unable to find shared memory region: 'ghost_region'" in info.value.message()
    # Size that does not match the shape.
    short = httpclient.InferInput("INPUT1", [1, 16], "INT32")
    short.set_shared_memory(name, a.nbytes - 4)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", [inputs[0], short])
    assert "byte size" in info.value.message()
    # Output region too small for the result.
    out_name, out_key, _ = regions(16)
    client.register_system_shared_memory(out_name, out_key, 16)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
    out.set_shared_memory(out_name, 16)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", inputs, outputs=[out])
    assert "should be at least 64 bytes to hold the results" in info.value.message()
    # Both data and a region for one input.
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [1, 16],
                    "datatype": "INT32",
                    "data": [1] * 16,
                    "parameters": {"shared_memory_region": name, "shared_memory_byte_size": 64},
                },
                {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
            ]
        }
    ).encode()
    request = urllib.request.Request(
        f"http://{server.url}/v2/models/simple/infer", data=body, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400
    # The server still serves shared-memory requests.
    result = client.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)


def test_region_removed_while_registered(client, regions):
    a = np.ones((1, 16), np.int32)
    name, inputs = simple_inputs_in_shm(client, regions, a, a)
    client.infer("simple", inputs)
    os.unlink(f"/dev/shm/{name}")
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple", inputs)
    assert "does not exist" in info.value.message()
    assert client.is_server_live()
    client.unregister_system_shared_memory(name)


def test_registration_refused_without_the_flag(server_without_client_shm, regions):
    client = httpclient.InferenceServerClient(server_without_client_shm.url)
    name, key, _ = regions(64)
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory(name, key, 64)
    assert "--allow-client-shm" in info.value.message()
    assert client.get_system_shared_memory_status() == []
    client.close()


def test_cuda_shared_memory_answers_clearly_without_a_gpu(server, client):
    body = json.dumps({"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 64}).encode()
    request = urllib.request.Request(
        f"http://{server.url}/v2/cudasharedmemory/region/gpu0/register", data=body, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 501
    assert "NVIDIA GPU" in json.loads(info.value.read())["error"]
    assert client.get_cuda_shared_memory_status() == []


def _cuda_unusable() -> str:
    from despina.common import cuda

    return cuda._probe()


@pytest.mark.skipif(
    bool(_cuda_unusable()),
    reason=f"CUDA shared memory needs an NVIDIA GPU and cupy: {_cuda_unusable()}",
)
def test_cuda_shared_memory_round_trip(client):
    import tritonclient.utils.cuda_shared_memory as cudashm

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, np.int32)
    inputs_region = cudashm.create_shared_memory_region("despina_gpu_in", 2 * a.nbytes, 0)
    outputs_region = cudashm.create_shared_memory_region("despina_gpu_out", 2 * a.nbytes, 0)
    try:
        cudashm.set_shared_memory_region(inputs_region, [a, b])
        client.register_cuda_shared_memory(
            "gpu_in", cudashm.get_raw_handle(inputs_region), 0, 2 * a.nbytes
        )
        client.register_cuda_shared_memory(
            "gpu_out", cudashm.get_raw_handle(outputs_region), 0, 2 * a.nbytes
        )
        status = {r["name"]: r for r in client.get_cuda_shared_memory_status()}
        assert status["gpu_in"]["byte_size"] == 2 * a.nbytes
        inputs, outputs = [], []
        for i, name in enumerate(("INPUT0", "INPUT1")):
            inp = httpclient.InferInput(name, [1, 16], "INT32")
            inp.set_shared_memory("gpu_in", a.nbytes, offset=i * a.nbytes)
            inputs.append(inp)
        for i, name in enumerate(("OUTPUT0", "OUTPUT1")):
            out = httpclient.InferRequestedOutput(name, binary_data=True)
            out.set_shared_memory("gpu_out", a.nbytes, offset=i * a.nbytes)
            outputs.append(out)
        client.infer("simple", inputs, outputs=outputs)
        sums = cudashm.get_contents_as_numpy(outputs_region, np.int32, [1, 16])
        np.testing.assert_array_equal(sums, a + b)
    finally:
        client.unregister_cuda_shared_memory()
        cudashm.destroy_shared_memory_region(inputs_region)
        cudashm.destroy_shared_memory_region(outputs_region)
