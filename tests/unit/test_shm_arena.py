"""common/shm/arena.py: server-owned blocks in /dev/shm (ShmArena) and the readers'
mapping cache (ShmMapper), on real shared memory."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from despina.common.errors import Code, ServerError
from despina.common.shm.arena import SHM_DIR, ShmArena, ShmMapper

SEGMENT = 64 * 1024


def shm_files(prefix: str) -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(prefix)}


@pytest.fixture()
def prefix() -> Iterator[str]:
    """A unique /dev/shm name prefix; whatever a test leaves under it is removed."""
    p = f"despina_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield p
    for name in shm_files(p):
        os.unlink(os.path.join(SHM_DIR, name))


@pytest.fixture()
def arena(prefix: str) -> Iterator[ShmArena]:
    a = ShmArena(prefix, SEGMENT)
    yield a
    a.close()


@pytest.fixture()
def raw_shm(prefix: str):
    """Writes a /dev/shm object named ``<prefix>_raw<n>`` holding ``data``; returns its key."""
    counter = iter(range(1000))

    def make(data: bytes) -> str:
        key = f"{prefix}_raw{next(counter)}"
        with open(os.path.join(SHM_DIR, key), "wb") as f:
            f.write(data)
        return key

    return make


def assert_invalid_arg(exc: ServerError, fragment: str) -> None:
    assert exc.code is Code.INVALID_ARG
    assert fragment in exc.message, exc.message


# --- ShmArena ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "rounded"), [(0, 64), (1, 64), (63, 64), (64, 64), (65, 128), (1000, 1024)]
)
def test_allocate_rounds_to_64_bytes(arena: ShmArena, prefix: str, size: int, rounded: int) -> None:
    key, offset, view = arena.allocate(size)
    assert key == f"{prefix}_0"
    assert offset == 0
    assert len(view) == rounded
    assert not view.readonly
    # The next block starts right after the rounded one.
    _, offset2, _ = arena.allocate(1)
    assert offset2 == rounded


def test_blocks_do_not_overlap(arena: ShmArena) -> None:
    blocks = []
    for i, size in enumerate([10, 64, 100, 200, 1, 4096]):
        key, offset, view = arena.allocate(size)
        view[:] = bytes([i + 1]) * len(view)
        blocks.append((key, offset, view, i + 1))
    extents = sorted((offset, offset + len(view)) for _, offset, view, _ in blocks)
    for (_, end), (start, _) in zip(extents, extents[1:]):
        assert end <= start
    for _, offset, view, fill in blocks:
        assert offset % 64 == 0
        assert bytes(view) == bytes([fill]) * len(view)
    assert arena.blocks_in_use == 6
    assert len({key for key, *_ in blocks}) == 1


def test_release_makes_the_block_reusable(arena: ShmArena) -> None:
    key_a, off_a, _ = arena.allocate(128)
    key_b, off_b, _ = arena.allocate(128)
    arena.release(key_a, off_a)
    assert arena.blocks_in_use == 1
    key_c, off_c, _ = arena.allocate(100)
    assert (key_c, off_c) == (key_a, off_a)
    assert arena.blocks_in_use == 2


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_freed_blocks_coalesce_into_the_whole_segment(
    arena: ShmArena, prefix: str, seed: int
) -> None:
    rng = random.Random(seed)
    blocks = []
    used = 0
    while True:
        size = rng.choice([1, 64, 65, 200, 512, 1000, 3000])
        rounded = (max(size, 1) + 63) // 64 * 64
        if used + rounded > SEGMENT:
            break
        key, offset, _ = arena.allocate(size)
        assert key == f"{prefix}_0"
        blocks.append((key, offset))
        used += rounded
    assert arena.blocks_in_use == len(blocks) > 20
    rng.shuffle(blocks)
    for key, offset in blocks:
        arena.release(key, offset)
    assert arena.blocks_in_use == 0
    key, offset, view = arena.allocate(SEGMENT)
    assert (key, offset, len(view)) == (f"{prefix}_0", 0, SEGMENT)
    assert shm_files(prefix) == {f"{prefix}_0"}


def test_full_segment_opens_another(arena: ShmArena, prefix: str) -> None:
    key0, _, _ = arena.allocate(SEGMENT - 64)
    key1, off1, _ = arena.allocate(128)
    assert key0 == f"{prefix}_0"
    assert (key1, off1) == (f"{prefix}_1", 0)
    # The tail of the first segment still serves a small block.
    key2, off2, _ = arena.allocate(64)
    assert (key2, off2) == (key0, SEGMENT - 64)
    assert shm_files(prefix) == {f"{prefix}_0", f"{prefix}_1"}
    assert os.path.getsize(os.path.join(SHM_DIR, key1)) == SEGMENT


def test_oversize_block_gets_its_own_segment_kept_for_reuse(arena: ShmArena, prefix: str) -> None:
    small_key, small_off, _ = arena.allocate(64)
    big_key, big_off, view = arena.allocate(SEGMENT + 1)
    assert big_key != small_key
    assert big_off == 0
    assert len(view) == SEGMENT + 64
    path = os.path.join(SHM_DIR, big_key)
    assert os.path.getsize(path) == 16 * 1024 * 1024  # rounded up to 16 MiB
    view[-3:] = b"end"
    del view
    assert arena.blocks_in_use == 2
    arena.release(big_key, big_off)
    assert arena.blocks_in_use == 1
    assert os.path.exists(path)  # kept: the next large block reuses its warm pages
    key, offset, _ = arena.allocate(SEGMENT + 100)
    assert (key, offset) == (big_key, 0)
    arena.release(key, offset)
    # A small block never lands in a big one.
    key, _, _ = arena.allocate(64)
    assert key == small_key


def test_idle_large_segments_beyond_the_cap_are_removed(prefix: str) -> None:
    arena = ShmArena(prefix, SEGMENT, max_idle_large=16 * 1024 * 1024)
    try:
        first = arena.allocate(SEGMENT * 2)
        second = arena.allocate(SEGMENT * 2)
        first[2][:4] = b"live"
        arena.release(*first[:2])
        assert os.path.exists(os.path.join(SHM_DIR, first[0]))
        arena.release(*second[:2])  # two idle 16 MiB segments > the 16 MiB cap
        assert not os.path.exists(os.path.join(SHM_DIR, first[0]))
        assert os.path.exists(os.path.join(SHM_DIR, second[0]))
        assert bytes(first[2][:4]) == b"live"  # the mapping outlives the name
        assert arena.blocks_in_use == 0
    finally:
        arena.close()
    assert shm_files(prefix) == set()


def test_release_unknown_or_twice_is_a_no_op(arena: ShmArena, prefix: str) -> None:
    key, offset, _ = arena.allocate(64)
    arena.release(key, offset)
    arena.release(key, offset)
    arena.release(key, 12345)
    arena.release("nope", 0)
    assert arena.blocks_in_use == 0
    # A double free that reached the free list would hand the same bytes out twice.
    first = arena.allocate(SEGMENT)
    second = arena.allocate(SEGMENT)
    assert first[:2] == (f"{prefix}_0", 0)
    assert second[:2] == (f"{prefix}_1", 0)


def test_close_removes_every_segment(prefix: str) -> None:
    arena = ShmArena(prefix, SEGMENT)
    arena.allocate(SEGMENT)
    arena.allocate(10)
    _, _, view = arena.allocate(SEGMENT * 3)
    assert len(shm_files(prefix)) == 3
    arena.close()
    assert shm_files(prefix) == set()
    assert arena.blocks_in_use == 0
    del view


# --- ShmMapper --------------------------------------------------------------------------


def test_mapper_reads_what_the_arena_wrote(arena: ShmArena) -> None:
    mapper = ShmMapper()
    blocks = []
    for i in range(5):
        payload = bytes([i]) * (i * 37 + 1) + b"\x00end"
        key, offset, view = arena.allocate(len(payload))
        view[: len(payload)] = payload
        blocks.append((key, offset, payload))
    for key, offset, payload in blocks:
        assert bytes(mapper.view(key, offset, len(payload))) == payload
    # Writes after the mapping exists are seen too: the memory is shared.
    key, offset, view = arena.allocate(8)
    assert bytes(mapper.view(key, offset, 8)) == bytes(8)
    view[:8] = b"12345678"
    assert bytes(mapper.view(key, offset, 8)) == b"12345678"
    assert bytes(mapper.view("/" + key, offset, 8)) == b"12345678"


def test_mapper_in_another_process(arena: ShmArena) -> None:
    payload = "héllo\x00shm".encode() + bytes(range(256))
    key, offset, view = arena.allocate(len(payload))
    view[: len(payload)] = payload
    code = (
        "import sys\n"
        "from despina.common.shm.arena import ShmMapper\n"
        "key, offset, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
        "sys.stdout.write(bytes(ShmMapper().view(key, offset, size)).hex())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, key, str(offset), str(len(payload))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert bytes.fromhex(out.stdout) == payload


@pytest.mark.parametrize(
    ("offset", "size"),
    [(-1, 4), (0, -1), (0, 101), (100, 1), (50, 51), (2**40, 1)],
)
def test_mapper_bounds(raw_shm, offset: int, size: int) -> None:
    key = raw_shm(bytes(100))
    with pytest.raises(ServerError) as exc_info:
        ShmMapper().view(key, offset, size)
    assert_invalid_arg(exc_info.value, f"is outside '{key}' of 100 bytes")


@pytest.mark.parametrize(("offset", "size"), [(0, 100), (99, 1), (100, 0), (0, 0), (40, 20)])
def test_mapper_edges_in_bounds(raw_shm, offset: int, size: int) -> None:
    data = bytes(range(100))
    key = raw_shm(data)
    assert bytes(ShmMapper().view(key, offset, size)) == data[offset : offset + size]


@pytest.mark.parametrize(
    "key",
    ["../etc/passwd", "a/b", "", "..", ".", "/", "/..", "/../etc/passwd", "x/../../etc/passwd"],
)
def test_mapper_refuses_keys_outside_dev_shm(key: str) -> None:
    with pytest.raises(ServerError) as exc_info:
        ShmMapper().view(key, 0, 1)
    assert_invalid_arg(exc_info.value, "invalid shared memory key")


def test_arena_refuses_a_prefix_outside_dev_shm() -> None:
    arena = ShmArena("../despina_escape", SEGMENT)
    with pytest.raises(ServerError) as exc_info:
        arena.allocate(1)
    assert_invalid_arg(exc_info.value, "invalid shared memory key")
    assert not os.path.exists(os.path.join(os.path.dirname(SHM_DIR), "despina_escape_0"))


def test_mapper_missing_key(prefix: str) -> None:
    key = f"{prefix}_missing"
    with pytest.raises(ServerError) as exc_info:
        ShmMapper().view(key, 0, 1)
    assert_invalid_arg(exc_info.value, f"shared memory object '{key}' does not exist")


def test_mapper_eviction_keeps_live_views(raw_shm) -> None:
    keys = [raw_shm(bytes([i]) * 64) for i in range(3)]
    mapper = ShmMapper(capacity=1)
    views = [mapper.view(key, 0, 64) for key in keys]  # each map evicts the previous one
    for i, view in enumerate(views):
        assert bytes(view) == bytes([i]) * 64
    assert bytes(mapper.view(keys[0], 0, 64)) == bytes(64)


def test_mapper_forget_remaps(raw_shm, prefix: str) -> None:
    key = raw_shm(b"a" * 10)
    mapper = ShmMapper()
    assert bytes(mapper.view(key, 0, 10)) == b"a" * 10
    with pytest.raises(ServerError):
        mapper.view(key, 0, 20)  # the cached mapping is 10 bytes
    os.unlink(os.path.join(SHM_DIR, key))
    with open(os.path.join(SHM_DIR, key), "wb") as f:
        f.write(b"b" * 20)
    mapper.forget(key)
    mapper.forget("never-mapped")
    assert bytes(mapper.view(key, 0, 20)) == b"b" * 20


# --- a full shm filesystem -------------------------------------------------------------


def allocated_bytes(key: str) -> int:
    return os.stat(os.path.join(SHM_DIR, key)).st_blocks * 512


def test_blocks_are_reserved_before_they_are_handed_out(arena: ShmArena) -> None:
    """posix_fallocate: the pages of a block exist before anyone touches them, so a full
    shm filesystem is an error at allocation, not a SIGBUS at the first store."""
    key, offset, view = arena.allocate(10_000)
    assert allocated_bytes(key) >= offset + 10_000
    big, _, _ = arena.allocate(2 * SEGMENT)  # a large segment of its own
    assert allocated_bytes(big) >= 2 * SEGMENT


@pytest.fixture()
def small_shm(tmp_path, monkeypatch):
    """A 1 MiB tmpfs standing in for /dev/shm (arena.SHM_DIR); skips where mounting is
    not allowed (not root)."""
    from despina.common.shm import arena as arena_module

    mountpoint = tmp_path / "shm"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root needed): {mounted.stderr.strip()}")
    monkeypatch.setattr(arena_module, "SHM_DIR", str(mountpoint))
    monkeypatch.setattr(arena_module, "_shm_dev", None)
    yield mountpoint
    monkeypatch.undo()
    arena_module._shm_dev = None
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_full_shm_filesystem_fails_the_allocation_not_the_process(small_shm, prefix) -> None:
    arena = ShmArena(prefix, 256 * 1024)
    try:
        blocks = [arena.allocate(250 * 1024) for _ in range(4)]  # 4 x 256 KiB segments
        for _, _, view in blocks:
            view[:] = b"x" * len(view)
        with pytest.raises(ServerError) as info:
            arena.allocate(250 * 1024)
        assert info.value.code is Code.UNAVAILABLE
        message = info.value.message
        assert message.startswith(f"out of shared memory: {small_shm} (1 MiB in all, ")
        assert "docker run --shm-size, compose shm_size" in message
        with pytest.raises(ServerError) as info:
            arena.allocate(3 << 20)  # a large segment: removed again, nothing reserved
        assert info.value.code is Code.UNAVAILABLE
        assert len(os.listdir(small_shm)) == 5  # the 4 segments and the one that failed
        # Once a block is back, the next request fits again, in reserved pages.
        key, offset, _ = blocks[0]
        arena.release(key, offset)
        again = arena.allocate(250 * 1024)
        assert again[:2] == (key, offset)
        again[2][:] = b"y" * len(again[2])
    finally:
        arena.close()
    assert os.listdir(small_shm) == []


def test_a_sparse_client_region_on_a_full_filesystem_fails_the_read_not_the_process(
    small_shm, prefix
) -> None:
    """tritonclient's regions are sparse until written: reading a never-written page
    through a mapping allocates it, a SIGBUS on a full filesystem. The mapper fills the
    block's holes first (zeros, as reading them would give), or refuses."""
    sparse = small_shm / "client_region"
    with open(sparse, "wb") as f:
        f.truncate(512 * 1024)
        f.write(b"written")
    mapper = ShmMapper()
    assert bytes(mapper.view("client_region", 0, 7)) == b"written"
    view = mapper.view("client_region", 0, 64 * 1024)  # holes filled: the pages exist
    assert os.stat(sparse).st_blocks * 512 >= 64 * 1024
    assert bytes(view[7:]) == bytes(64 * 1024 - 7)
    del view
    filler = small_shm / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        with pytest.raises(OSError):  # takes what is left (a failed fallocate takes nothing)
            for _ in range(64):
                os.write(fd, bytes(64 * 1024))
    finally:
        os.close(fd)
    with pytest.raises(ServerError) as info:
        mapper.view("client_region", 0, 512 * 1024)
    assert info.value.code is Code.UNAVAILABLE
    assert info.value.message.startswith(f"out of shared memory: {small_shm} (1 MiB in all, ")
    assert bytes(mapper.view("client_region", 0, 7)) == b"written"  # the rest still serves
    mapper.forget("client_region")
    os.unlink(filler)
    os.unlink(sparse)
