"""Triton's system shared-memory extension over gRPC, error cases: what
``tests/e2e/test_shared_memory.py`` checks over HTTP, driven here by tritonclient.grpc
with tritonclient's own shared-memory utilities as the client (and a raw
``GRPCInferenceServiceStub`` for the one request tritonclient never sends). Each error
carries its gRPC status and a message that says what to fix, and the server answers a
normal inference afterwards. The happy paths, double registration, a missing key and an
unknown region are in ``test_grpc.py::test_system_shared_memory``."""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from test_grpc import INVALID, assert_still_serving, infer_error, raw_request
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import TRANSPORTS


# Both transports of each protocol: lean HTTP + Despina's HTTP/2 gRPC, aiohttp + grpc.aio.
@pytest.fixture(scope="module", params=TRANSPORTS)
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


UNAVAILABLE = "StatusCode.UNAVAILABLE"
ONES = np.ones((1, 16), np.int32)
NBYTES = ONES.nbytes  # 64: one [1, 16] INT32 tensor of the "simple" model


class Regions:
    """Client regions made for one test; whatever the test has not destroyed itself is
    destroyed at teardown."""

    def __init__(self) -> None:
        self.handles: list = []

    def make(self, byte_size: int):
        name = f"despina_grpc_{uuid.uuid4().hex[:8]}"
        handle = shm.create_shared_memory_region(name, "/" + name, byte_size)
        self.handles.append(handle)
        return name, "/" + name, handle

    def destroy(self, handle) -> None:
        self.handles.remove(handle)
        shm.destroy_shared_memory_region(handle)


@pytest.fixture()
def regions():
    made = Regions()
    yield made
    for handle in list(made.handles):
        made.destroy(handle)


@pytest.fixture()
def client(server):
    """A gRPC client of the session's server (started with --allow-client-shm=true); no
    region is registered before or after the test."""
    c = grpcclient.InferenceServerClient(server.grpc_url)
    c.unregister_system_shared_memory()
    yield c
    c.unregister_system_shared_memory()
    c.close()


def shm_input(name: str, region: str, byte_size: int = NBYTES, offset: int = 0):
    inp = grpcclient.InferInput(name, [1, 16], "INT32")
    inp.set_shared_memory(region, byte_size, offset=offset)
    return inp


def registered_inputs(client, regions):
    """A region holding ONES twice, registered, and the two inputs of "simple" in it."""
    name, key, handle = regions.make(2 * NBYTES)
    shm.set_shared_memory_region(handle, [ONES, ONES])
    client.register_system_shared_memory(name, key, 2 * NBYTES)
    inputs = [shm_input("INPUT0", name), shm_input("INPUT1", name, offset=NBYTES)]
    return name, handle, inputs


@pytest.fixture()
def stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


BOTH_WAYS = {
    "contents": (
        "input 'INPUT1' sets both 'contents' and 'shared_memory_region'; give its data one way"
    ),
    "raw": (
        "raw_input_contents holds 2 entries but the request's inputs use 1; give exactly one "
        "entry per input that has neither 'contents' nor a shared-memory region, in input order"
    ),
}


@pytest.mark.parametrize("data", list(BOTH_WAYS))
def test_an_input_with_both_data_and_a_region_is_refused(stub, client, regions, data):
    """tritonclient drops an input's data when a region is set (and the other way round),
    so the request is built by hand: INPUT1 names a region and also has typed contents or
    a raw_input_contents entry."""
    name, _, _ = registered_inputs(client, regions)
    ok = ONES.tobytes()
    request = raw_request(
        "simple", [("INPUT0", "INT32", [1, 16], ok), ("INPUT1", "INT32", [1, 16], ok)]
    )
    if data == "contents":
        del request.raw_input_contents[1]
        request.inputs[1].contents.int_contents.extend([1] * 16)
    request.inputs[1].parameters["shared_memory_region"].string_param = name
    request.inputs[1].parameters["shared_memory_byte_size"].int64_param = NBYTES
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == BOTH_WAYS[data]
    assert_still_serving(client)


@pytest.mark.parametrize("byte_size", [NBYTES - 4, NBYTES + 4], ids=["short", "long"])
def test_a_byte_size_that_does_not_match_the_shape_is_refused(client, regions, byte_size):
    name, key, handle = regions.make(2 * NBYTES)
    shm.set_shared_memory_region(handle, [ONES, ONES])
    client.register_system_shared_memory(name, key, 2 * NBYTES)
    inputs = [shm_input("INPUT0", name), shm_input("INPUT1", name, byte_size, offset=NBYTES - 4)]
    err = infer_error(client, "simple", inputs)
    assert err.status() == INVALID
    assert err.message() == (
        "input byte size mismatch for input 'INPUT1' for model 'simple'. "
        f"Expected 64, got {byte_size}"
    )
    assert_still_serving(client)


def test_an_input_past_the_end_of_its_region_is_refused(client, regions):
    name, _, inputs = registered_inputs(client, regions)
    past = shm_input("INPUT1", name, offset=NBYTES + 4)
    err = infer_error(client, "simple", [inputs[0], past])
    assert err.status() == INVALID
    assert err.message() == (
        f"Invalid offset + byte size for shared memory region: '{name}' (for input 'INPUT1': "
        "offset 68 + byte size 64 > region size 128)"
    )
    # The same region, in bounds, still serves.
    result = client.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * ONES)
    assert_still_serving(client)


def test_an_output_past_the_end_of_its_region_is_refused(client, regions):
    _, _, inputs = registered_inputs(client, regions)
    out_name, out_key, out_handle = regions.make(2 * NBYTES)
    client.register_system_shared_memory(out_name, out_key, 2 * NBYTES)
    out = grpcclient.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory(out_name, NBYTES, offset=NBYTES + 8)
    err = infer_error(client, "simple", inputs, outputs=[out])
    assert err.status() == INVALID
    assert err.message() == (
        f"Invalid offset + byte size for shared memory region: '{out_name}' "
        "(for output 'OUTPUT0': offset 72 + byte size 64 > region size 128)"
    )
    # Nothing was written into the region.
    assert not shm.get_contents_as_numpy(out_handle, np.int32, [1, 32]).any()
    assert_still_serving(client)


def test_a_region_too_small_for_the_output_is_refused(client, regions):
    _, _, inputs = registered_inputs(client, regions)
    out_name, out_key, out_handle = regions.make(16)
    client.register_system_shared_memory(out_name, out_key, 16)
    out = grpcclient.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory(out_name, 16)
    err = infer_error(client, "simple", inputs, outputs=[out])
    assert err.status() == INVALID
    assert err.message() == (
        "shared memory size specified with the request for output 'OUTPUT0' (16 bytes) "
        "should be at least 64 bytes to hold the results"
    )
    assert not shm.get_contents_as_numpy(out_handle, np.int32, [1, 4]).any()
    assert_still_serving(client)


@pytest.mark.parametrize("key", ["../../etc/passwd", "/../etc/passwd", "a/b", "..", ""])
def test_keys_cannot_escape_dev_shm(client, key):
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory("evil", key, 8)
    assert info.value.status() == INVALID
    assert info.value.message() == f"Unable to open shared memory region: '{key}'"
    assert not client.get_system_shared_memory_status().regions
    assert_still_serving(client)


def test_registration_is_refused_without_the_flag(server_without_client_shm, regions):
    client = grpcclient.InferenceServerClient(server_without_client_shm.grpc_url)
    try:
        name, key, _ = regions.make(64)
        with pytest.raises(InferenceServerException) as info:
            client.register_system_shared_memory(name, key, 64)
        assert info.value.status() == UNAVAILABLE
        assert info.value.message() == (
            "client shared memory is disabled on this server: start it with "
            "--allow-client-shm=true to let clients register regions"
        )
        assert not client.get_system_shared_memory_status().regions
        assert_still_serving(client)
    finally:
        client.close()


def test_a_region_destroyed_while_registered_fails_the_request_not_the_server(client, regions):
    name, handle, inputs = registered_inputs(client, regions)
    result = client.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * ONES)
    regions.destroy(handle)
    err = infer_error(client, "simple", inputs)
    assert err.status() == INVALID
    assert err.message() == (
        f"shared memory object '/{name}' does not exist (was it removed while registered?)"
    )
    assert client.is_server_live()
    assert list(client.get_system_shared_memory_status().regions) == [name]
    assert_still_serving(client)
    client.unregister_system_shared_memory(name)
    assert not client.get_system_shared_memory_status().regions
