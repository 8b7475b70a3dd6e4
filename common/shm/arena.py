"""Server-owned shared-memory blocks (``ShmArena``) and the readers' mapping cache
(``ShmMapper``).

An arena is a few large ``/dev/shm`` segments carved by a first-fit free list. The
process that allocates a block owns it and is the only one that frees it; it hands
``Shm(key, offset, size)`` refs to peers, who map the segment read-only through
``ShmMapper`` and must be done with the bytes before the owner is told so (for a
frontend's input blocks: when the request's reply arrives). Segments are mapped with
``mmap`` directly, not ``multiprocessing.shared_memory`` (its resource tracker may unlink
segments it does not own).
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections import OrderedDict

from despina.common.errors import invalid_arg

SHM_DIR = "/dev/shm"
_ALIGN = 64


def _shm_path(key: str) -> str:
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
        fd = os.open(_shm_path(key), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
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
            os.unlink(_shm_path(self.key))
        except FileNotFoundError:
            pass


class ShmArena:
    """Allocates blocks in segments named ``<prefix>_<n>``; one owner process.

    Not thread-safe. ``allocate`` returns (key, offset, writable view); ``release`` takes
    the key and offset back. A request larger than the segment size gets a segment of
    its own, removed when released.
    """

    def __init__(self, prefix: str, segment_size: int = 64 * 1024 * 1024) -> None:
        self.prefix = prefix
        self.segment_size = segment_size
        self._segments: dict[str, _Segment] = {}
        self._sizes: dict[tuple[str, int], int] = {}
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
            seg = self._new_segment(size)
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

    def release(self, key: str, offset: int) -> None:
        size = self._sizes.pop((key, offset), None)
        if size is None:
            return
        seg = self._segments[key]
        if seg.size != self.segment_size:
            del self._segments[key]
            seg.close()
        else:
            seg.release(offset, size)

    @property
    def blocks_in_use(self) -> int:
        return len(self._sizes)

    def close(self) -> None:
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
        self._sizes.clear()


class ShmMapper:
    """Maps shared-memory objects by key for reading, caching at most ``capacity``
    mappings (least recently used dropped first). Safe in one thread only."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()

    def view(self, key: str, offset: int, size: int) -> memoryview:
        mm = self._maps.get(key)
        if mm is None:
            mm = self._map(key)
        else:
            self._maps.move_to_end(key)
        if offset < 0 or size < 0 or offset + size > len(mm):
            raise invalid_arg(
                f"shared memory block [{offset}, {offset + size}) is outside '{key}' "
                f"of {len(mm)} bytes"
            )
        return memoryview(mm)[offset : offset + size]

    def _map(self, key: str) -> mmap.mmap:
        path = _shm_path(key)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise invalid_arg(f"shared memory object '{key}' does not exist") from None
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._maps[key] = mm
        while len(self._maps) > self.capacity:
            _, old = self._maps.popitem(last=False)
            try:
                old.close()
            except BufferError:
                pass  # a view still uses it; it is unmapped when the last view goes
        return mm

    def forget(self, key: str) -> None:
        mm = self._maps.pop(key, None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass
