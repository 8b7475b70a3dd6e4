"""The client region registry: registration checks, bounds, and the CUDA path's clear
refusal on machines without a GPU."""

from __future__ import annotations

import os
import uuid

import pytest

from despina.common import cuda
from despina.common.errors import Code, ServerError
from despina.common.messages import Shm
from despina.common.shm.regions import RegionRegistry


@pytest.fixture()
def shm_object():
    name = f"despina_unit_{uuid.uuid4().hex[:8]}"
    path = f"/dev/shm/{name}"
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    yield name
    os.unlink(path)


def test_register_resolve_and_bounds(shm_object):
    reg = RegionRegistry()
    reg.register("r", shm_object, 1024, 2048)
    assert reg.resolve("r", 16, 64, "input 'x'") == Shm(shm_object, 1040, 64)
    assert reg.status() == [{"name": "r", "key": shm_object, "offset": 1024, "byte_size": 2048}]
    with pytest.raises(ServerError) as info:
        reg.resolve("r", 2000, 64, "input 'x'")
    assert (
        info.value.code is Code.INVALID_ARG and "Invalid offset + byte size" in info.value.message
    )
    with pytest.raises(ServerError) as info:
        reg.resolve("nope", 0, 1, "output 'y'")
    assert "Unable to find shared memory region: 'nope' (for output 'y')" in info.value.message
    with pytest.raises(ServerError) as info:
        reg.register("r", shm_object, 0, 8)
    assert info.value.code is Code.ALREADY_EXISTS
    with pytest.raises(ServerError) as info:
        reg.register("big", shm_object, 4000, 200)
    assert "beyond the end" in info.value.message
    reg.unregister("r")
    reg.unregister("r")  # unknown names are fine
    assert reg.status() == []


@pytest.mark.parametrize("key", ["../etc/passwd", "a/b", "", "..", "/"])
def test_keys_stay_in_dev_shm(key):
    with pytest.raises(ServerError) as info:
        RegionRegistry().register("r", key, 0, 8)
    assert info.value.code is Code.INVALID_ARG


@pytest.mark.skipif(not cuda._probe(), reason="this machine has a usable GPU")
def test_cuda_registration_refused_without_gpu():
    reg = RegionRegistry()
    with pytest.raises(ServerError) as info:
        reg.register_cuda("g", b"\0" * 64, 0, 1024)
    assert info.value.code is Code.UNSUPPORTED
    assert "NVIDIA GPU" in info.value.message and cuda._probe() in info.value.message
    assert reg.cuda_status() == []
