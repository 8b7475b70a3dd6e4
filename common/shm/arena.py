"""Server-owned shared-memory blocks (``ShmArena``) and the readers' mapping cache
(``ShmMapper``).

An arena is a few large ``/dev/shm`` segments carved by a first-fit free list. The
process that allocates a block owns it and is the only one that frees it; it hands
``Shm(key, offset, size)`` refs to peers, who map the segment read-only through
``ShmMapper`` and must be done with the bytes before the owner is told so (for a
frontend's input blocks: when the request's reply arrives). ``ShmMapper`` maps
read-write only where asked to (a client's output region). Segments are mapped with
``mmap`` directly, not ``multiprocessing.shared_memory`` (its resource tracker may unlink
segments it does not own).
"""

from __future__ import annotations

import bisect
import mmap
import os
import re
import uuid
from collections import OrderedDict

from despina.common.errors import invalid_arg

SHM_DIR = "/dev/shm"
_ALIGN = 64


def arena_prefix(role: str) -> str:
    """Segment names carry the owner's pid, so a supervisor can remove the segments of a
    child that died without cleaning up (``remove_segments_of``)."""
    return f"despina_{role}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


def remove_segments_of(pid: int) -> int:
    """Unlink the arena segments a dead process left in /dev/shm; returns how many."""
    pattern = re.compile(rf"despina_[a-z]+_{pid}_[0-9a-f]+_\d+")
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if pattern.fullmatch(name):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
            except OSError:
                pass
    return removed


def shm_path(key: str) -> str:
    """Path of a shared-memory object named ``key``; refuses names that leave /dev/shm."""
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or name in (".", ".."):
        raise invalid_arg(f"invalid shared memory key '{key}': it must name an object in {SHM_DIR}")
    return os.path.join(SHM_DIR, name)


class _Segment:
    __slots__ = ("key", "size", "mm", "free")

    def __init__(self, key: str, size: int) -> None:
        self.key = key
        self.size = size
        fd = os.open(shm_path(key), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        # Sorted, non-overlapping free extents: offsets and their sizes.
        self.free: list[list[int]] = [[0, size]]

    def allocate(self, size: int) -> int | None:
        for i, (offset, length) in enumerate(self.free):
            if length >= size:
                if length == size:
                    del self.free[i]
                else:
                    self.free[i] = [offset + size, length - size]
                return offset
        return None

    def release(self, offset: int, size: int) -> None:
        free = self.free
        i = bisect.bisect_left(free, [offset, 0])
        free.insert(i, [offset, size])
        # Coalesce with the neighbours.
        if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:
            free[i][1] += free[i + 1][1]
            del free[i + 1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == free[i][0]:
            free[i - 1][1] += free[i][1]
            del free[i]

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes with the process
        try:
            os.unlink(shm_path(self.key))
        except FileNotFoundError:
            pass


class ShmArena:
    """Allocates blocks in segments named ``<prefix>_<n>``; one owner process.

    Not thread-safe. ``allocate`` returns (key, offset, writable view); ``release`` takes
    the key and offset back. A request larger than the segment size gets a segment of
    its own (rounded up to 16 MiB). Released, such a segment is kept for the next large
    block, up to ``max_idle_large`` bytes of idle ones (the oldest are removed first):
    a fresh segment costs a page fault per 4 KiB on first touch, in this process and in
    every reader, which made a 64 MiB tensor three times slower than a 16 MiB one.
    """

    def __init__(
        self,
        prefix: str,
        segment_size: int = 64 * 1024 * 1024,
        max_idle_large: int = 256 * 1024 * 1024,
    ) -> None:
        self.prefix = prefix
        self.segment_size = segment_size
        self.max_idle_large = max_idle_large
        self._segments: dict[str, _Segment] = {}
        self._sizes: dict[tuple[str, int], int] = {}
        self._idle_large: dict[str, _Segment] = {}  # insertion order: oldest first
        self._counter = 0

    def _new_segment(self, size: int) -> _Segment:
        key = f"{self.prefix}_{self._counter}"
        self._counter += 1
        seg = _Segment(key, size)
        self._segments[key] = seg
        return seg

    def allocate(self, size: int) -> tuple[str, int, memoryview]:
        size = max(_ALIGN, (size + _ALIGN - 1) // _ALIGN * _ALIGN)
        if size > self.segment_size:
            seg = self._large_segment(size)
            offset = seg.allocate(size)
        else:
            offset = None
            for seg in self._segments.values():
                if seg.size == self.segment_size:
                    offset = seg.allocate(size)
                    if offset is not None:
                        break
            if offset is None:
                seg = self._new_segment(self.segment_size)
                offset = seg.allocate(size)
        assert offset is not None
        self._sizes[(seg.key, offset)] = size
        return seg.key, offset, memoryview(seg.mm)[offset : offset + size]

    def _large_segment(self, size: int) -> _Segment:
        """An idle large segment that fits without wasting more than half, or a new one."""
        step = 16 * 1024 * 1024
        rounded = (size + step - 1) // step * step
        for key, seg in self._idle_large.items():
            if size <= seg.size <= 2 * rounded:
                del self._idle_large[key]
                return seg
        return self._new_segment(rounded)

    def release(self, key: str, offset: int) -> None:
        size = self._sizes.pop((key, offset), None)
        if size is None:
            return
        seg = self._segments[key]
        seg.release(offset, size)
        if seg.size != self.segment_size:
            self._idle_large[key] = seg
            while sum(s.size for s in self._idle_large.values()) > self.max_idle_large:
                oldest = next(iter(self._idle_large))
                del self._segments[oldest]
                self._idle_large.pop(oldest).close()

    @property
    def blocks_in_use(self) -> int:
        return len(self._sizes)

    def close(self) -> None:
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
        self._sizes.clear()
        self._idle_large.clear()


class ShmMapper:
    """Maps shared-memory objects by key, caching at most ``capacity`` mappings (least
    recently used dropped first). Safe in one thread only.

    A view is read-only unless asked ``writable``: the object is then opened
    ``O_RDONLY`` and mapped ``PROT_READ``, so a reader cannot scribble on a client's
    input region, and an object the server may only read still serves as input. Read
    and write mappings are cached apart (one key may hold one of each) rather than one
    upgraded to read-write: an upgrade would hand later reads a writable mapping, and
    would have to unmap a mapping whose views may still be alive.

    Each ``view`` checks the object as it is now (one ``stat``): a key that no longer
    exists, an object replaced under the same key, or one shrunk below the block gives a
    clear INVALID_ARG instead of stale data or a SIGBUS.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        # (path, writable) -> (inode, mapping)
        self._maps: OrderedDict[tuple[str, bool], tuple[int, mmap.mmap]] = OrderedDict()

    def view(self, key: str, offset: int, size: int, *, writable: bool = False) -> memoryview:
        """``size`` bytes at ``offset`` in object ``key``; a read-only memoryview unless
        ``writable``. Raises INVALID_ARG (recoverable: the request fails, the mapper
        stays usable) for a bad key, a missing object or a block outside it."""
        path = shm_path(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self.forget(key)
            raise invalid_arg(
                f"shared memory object '{key}' does not exist (was it removed while registered?)"
            ) from None
        if offset < 0 or size < 0 or offset + size > st.st_size:
            raise invalid_arg(
                f"shared memory block [{offset}, {offset + size}) is outside '{key}' "
                f"of {st.st_size} bytes"
            )
        slot = (path, writable)
        cached = self._maps.get(slot)
        if cached is None or cached[0] != st.st_ino or len(cached[1]) < offset + size:
            mm = self._map(key, slot)
        else:
            mm = cached[1]
            self._maps.move_to_end(slot)
        return memoryview(mm)[offset : offset + size]

    def _map(self, key: str, slot: tuple[str, bool]) -> mmap.mmap:
        path, writable = slot
        cached = self._maps.pop(slot, None)
        if cached is not None:
            _close(cached[1])
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except FileNotFoundError:
            raise invalid_arg(f"shared memory object '{key}' does not exist") from None
        except PermissionError:
            mode = "reading and writing" if writable else "reading"
            raise invalid_arg(f"shared memory object '{key}' cannot be opened for {mode}") from None
        try:
            st = os.fstat(fd)
            if st.st_size == 0:
                raise invalid_arg(f"shared memory object '{key}' is empty")
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            mm = mmap.mmap(fd, st.st_size, access=access)
        finally:
            os.close(fd)
        self._maps[slot] = (st.st_ino, mm)
        while len(self._maps) > self.capacity:
            _, (_, old) = self._maps.popitem(last=False)
            _close(old)
        return mm

    def forget(self, key: str) -> None:
        """Drop both mappings of ``key`` (live views keep theirs until they go)."""
        path = shm_path(key)
        for writable in (False, True):
            cached = self._maps.pop((path, writable), None)
            if cached is not None:
                _close(cached[1])


def _close(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        pass  # a view still uses it; it is unmapped when the last view goes
