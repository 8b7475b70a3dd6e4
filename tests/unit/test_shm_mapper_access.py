"""common/shm/arena.py: ShmMapper maps read-only unless asked for a writable view, keeps
the two kinds of mapping apart, and still refuses removed, replaced or shrunk objects."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from despina.common.errors import Code, ServerError
from despina.common.shm.arena import SHM_DIR, ShmMapper


@pytest.fixture()
def make_object() -> Iterator:
    """Writes /dev/shm objects holding given bytes; returns (key, path); removes them."""
    paths: list[str] = []

    def make(data: bytes) -> tuple[str, str]:
        key = f"despina_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        path = os.path.join(SHM_DIR, key)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
        return key, path

    yield make
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def permissions_of(path: str) -> list[str]:
    """The permission column of this process's mappings of ``path``."""
    with open("/proc/self/maps") as f:
        return [line.split()[1] for line in f if line.rstrip().endswith(" " + path)]


def test_views_are_read_only_by_default(make_object) -> None:
    key, path = make_object(bytes(range(64)))
    view = ShmMapper().view(key, 0, 64)
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 1
    array = np.frombuffer(view, np.uint8)
    assert not array.flags.writeable
    with pytest.raises(ValueError):
        array[0] = 1
    assert permissions_of(path) == ["r--s"]
    del view, array


def test_writable_views_write_through_to_read_only_ones(make_object) -> None:
    key, path = make_object(bytes(16))
    mapper = ShmMapper()
    reader = mapper.view(key, 0, 16)
    writer = mapper.view(key, 0, 16, writable=True)
    assert not writer.readonly
    writer[:] = b"0123456789abcdef"
    assert bytes(reader) == b"0123456789abcdef"
    with open(path, "rb") as f:
        assert f.read() == b"0123456789abcdef"
    # One mapping of each kind, cached: asking again maps nothing new.
    mapper.view(key, 0, 16)
    mapper.view(key, 0, 16, writable=True)
    assert sorted(permissions_of(path)) == ["r--s", "rw-s"]
    del reader, writer


def test_both_kinds_count_against_the_capacity(make_object) -> None:
    key, path = make_object(bytes(64))
    other, _ = make_object(bytes(64))
    mapper = ShmMapper(capacity=2)
    mapper.view(key, 0, 64)
    mapper.view(key, 0, 64, writable=True)
    assert sorted(permissions_of(path)) == ["r--s", "rw-s"]
    mapper.view(other, 0, 64)  # evicts the least recently used: the read-only one
    assert permissions_of(path) == ["rw-s"]
    mapper.forget(key)
    assert permissions_of(path) == []


@pytest.mark.parametrize("writable", [False, True])
def test_shrunk_replaced_or_removed_objects_fail_clearly(make_object, writable: bool) -> None:
    key, path = make_object(b"a" * 8192)
    mapper = ShmMapper()
    assert bytes(mapper.view(key, 4096, 4, writable=writable)) == b"aaaa"
    os.truncate(path, 100)
    with pytest.raises(ServerError) as info:
        mapper.view(key, 4096, 4, writable=writable)
    assert info.value.code is Code.INVALID_ARG
    assert "is outside" in info.value.message
    os.unlink(path)
    with open(path, "wb") as f:
        f.write(b"b" * 8192)
    assert bytes(mapper.view(key, 4096, 4, writable=writable)) == b"bbbb"
    os.unlink(path)
    with pytest.raises(ServerError) as info:
        mapper.view(key, 0, 4, writable=writable)
    assert "does not exist" in info.value.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens a read-only file for writing")
def test_a_read_only_object_serves_reads_but_not_writes(make_object) -> None:
    key, path = make_object(b"ro" * 8)
    os.chmod(path, 0o444)
    mapper = ShmMapper()
    assert bytes(mapper.view(key, 0, 16)) == b"ro" * 8
    with pytest.raises(ServerError) as info:
        mapper.view(key, 0, 16, writable=True)
    assert "cannot be opened for reading and writing" in info.value.message


def test_writes_go_through_pwrite_without_a_mapping(make_object) -> None:
    key, path = make_object(bytes(32))
    mapper = ShmMapper()
    mapper.write(key, 8, b"abcd")
    mapper.write(key, 16, memoryview(np.arange(4, dtype=np.uint8)))
    with open(path, "rb") as f:
        assert f.read() == bytes(8) + b"abcd" + bytes(4) + bytes([0, 1, 2, 3]) + bytes(12)
    assert permissions_of(path) == []  # nothing mapped: a shrunk file cannot SIGBUS a write
    with pytest.raises(ServerError) as info:
        mapper.write(key, 30, b"abcd")
    assert info.value.code is Code.INVALID_ARG
    assert info.value.message == f"shared memory block [30, 34) is outside '{key}' of 32 bytes"
    os.truncate(path, 10)
    with pytest.raises(ServerError) as info:
        mapper.write(key, 8, b"abcd")
    assert info.value.message == f"shared memory block [8, 12) is outside '{key}' of 10 bytes"
    os.truncate(path, 32)
    mapper.write(key, 8, b"wxyz")
    with open(path, "rb") as f:
        assert f.read(12) == bytes(8) + b"wxyz"


@pytest.mark.parametrize("writable", [False, True])
def test_a_key_swapped_for_a_symlink_is_refused(tmp_path, make_object, writable: bool) -> None:
    """Registered as a plain object, then replaced by a link to a file elsewhere (the
    TOCTOU of a registration check): no read of it, no write into it."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 64)
    key, path = make_object(b"a" * 64)
    mapper = ShmMapper()
    assert bytes(mapper.view(key, 0, 4, writable=writable)) == b"aaaa"
    mapper.write(key, 0, b"bbbb")
    os.unlink(path)
    os.symlink(secret, path)
    expected = (
        f"shared memory object '{key}' is no longer a plain shared memory object "
        "(was it replaced while registered?)"
    )
    with pytest.raises(ServerError) as info:
        mapper.view(key, 0, 4, writable=writable)
    assert (info.value.code, info.value.message) == (Code.INVALID_ARG, expected)
    with pytest.raises(ServerError) as info:
        mapper.write(key, 0, b"pwnd")
    assert (info.value.code, info.value.message) == (Code.INVALID_ARG, expected)
    assert secret.read_bytes() == b"s" * 64


def test_directories_fifos_and_hard_links_are_refused(make_object) -> None:
    key, path = make_object(b"a" * 64)
    linked = path + "_link"
    os.link(path, linked)
    fifo = path + "_fifo"
    os.mkfifo(fifo)
    folder = path + "_dir"
    os.mkdir(folder)
    try:
        for name in (key, key + "_link", key + "_fifo", key + "_dir"):
            with pytest.raises(ServerError) as info:
                ShmMapper().view(name, 0, 0)
            assert info.value.code is Code.INVALID_ARG
            assert "is no longer a plain shared memory object" in info.value.message
    finally:
        os.unlink(linked)
        os.unlink(fifo)
        os.rmdir(folder)
    assert bytes(ShmMapper().view(key, 0, 2)) == b"aa"  # one name again: fine
