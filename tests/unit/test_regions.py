"""The client region registry: registration checks, bounds, and the CUDA path's clear
refusal on machines without a GPU."""

from __future__ import annotations

import os
import uuid

import pytest

from despina.common import cuda
from despina.common.errors import Code, ServerError
from despina.common.messages import Shm
from despina.common.shm.arena import ShmArena, arena_prefix
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
    assert info.value.code is Code.INVALID_ARG
    assert info.value.message == (
        "failed to register shared memory region 'big': invalid args (offset 4000 + "
        f"byte_size 200 is past the end of '{shm_object}' (4096 bytes))"
    )
    with pytest.raises(ServerError) as info:
        reg.register("empty", shm_object, 0, 0)
    assert info.value.message.startswith(
        "failed to register shared memory region 'empty': invalid args"
    )
    with pytest.raises(ServerError) as info:
        reg.resolve("r", 2048, 1, "output 'y'")  # the offset itself is past the region
    assert info.value.message.startswith("Invalid offset for shared memory region: 'r'")
    reg.unregister("r")
    reg.unregister("r")  # unknown names are fine
    assert reg.status() == []


@pytest.mark.parametrize("key", ["../etc/passwd", "a/b", "", "..", "/", "a\0b", "x" * 300])
def test_keys_stay_in_dev_shm(key):
    with pytest.raises(ServerError) as info:
        RegionRegistry().register("r", key, 0, 8)
    assert info.value.code is Code.INVALID_ARG
    assert info.value.message == f"Unable to open shared memory region: '{key}'"


def refusal(key: str, byte_size: int = 8) -> str:
    """The message registering ``key`` gets (it must be refused)."""
    with pytest.raises(ServerError) as info:
        RegionRegistry().register("r", key, 0, byte_size)
    assert info.value.code is Code.INVALID_ARG
    return info.value.message


def test_every_refusal_reads_the_same(tmp_path, shm_object, shm_dir_entries):
    """Missing, a directory, a fifo, a symlink to a file that exists (and one that does
    not), a hard link: one message, naming only the key. (An object too small for the
    region answers Triton's "invalid args": it is one the client may register.)"""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 4096)
    keys = {
        "missing": f"despina_unit_missing_{uuid.uuid4().hex[:8]}",
        "directory": shm_dir_entries(os.mkdir),
        "fifo": shm_dir_entries(os.mkfifo),
        "symlink": shm_dir_entries(lambda p: os.symlink(secret, p)),
        "dangling": shm_dir_entries(lambda p: os.symlink(tmp_path / "nothing", p)),
        "symlink_in_shm": shm_dir_entries(lambda p: os.symlink(f"/dev/shm/{shm_object}", p)),
        "hard_link": shm_dir_entries(lambda p: os.link(f"/dev/shm/{shm_object}", p)),
    }
    for what, key in keys.items():
        assert refusal(key) == f"Unable to open shared memory region: '{key}'", what
        assert refusal("/" + key) == f"Unable to open shared memory region: '/{key}'", what
    assert secret.read_bytes() == b"s" * 4096


def test_a_fifo_is_refused_without_blocking(shm_dir_entries):
    """Opening a fifo for reading would wait for a writer: it is never opened."""
    key = shm_dir_entries(os.mkfifo)
    assert refusal(key) == f"Unable to open shared memory region: '{key}'"


@pytest.mark.parametrize(
    "key", ["despina_fe_12_0123abcd_0", "/despina_bh_7_ab_3", "despina_stub_1_"]
)
def test_arena_names_are_reserved_even_when_missing(key):
    assert refusal(key) == f"Unable to open shared memory region: '{key}'"


def test_a_live_arena_segment_is_refused():
    arena = ShmArena(arena_prefix("fe"), 1 << 20)
    try:
        key, _, _ = arena.allocate(4096)
        assert os.path.exists(f"/dev/shm/{key}")
        assert refusal(key) == f"Unable to open shared memory region: '{key}'"
        assert refusal("/" + key) == f"Unable to open shared memory region: '/{key}'"
    finally:
        arena.close()


def test_a_plain_object_with_a_leading_slash_registers(shm_object):
    reg = RegionRegistry()
    reg.register("r", "/" + shm_object, 0, 4096)
    assert reg.resolve("r", 0, 8, "input 'x'") == Shm("/" + shm_object, 0, 8)


@pytest.mark.skipif(not cuda._probe(), reason="this machine has a usable GPU")
def test_cuda_registration_refused_without_gpu():
    reg = RegionRegistry()
    with pytest.raises(ServerError) as info:
        reg.register_cuda("g", b"\0" * 64, 0, 1024)
    assert info.value.code is Code.UNSUPPORTED
    assert "NVIDIA GPU" in info.value.message and cuda._probe() in info.value.message
    assert reg.cuda_status() == []
