"""Server-owned shared-memory blocks (``ShmArena``), the readers' mapping cache
(``ShmMapper``) and the one safe way to open a shared-memory object by key
(``open_object``).

An arena is a few large segments in the shm filesystem carved by a first-fit free list.
The process that allocates a block owns it and is the only one that frees it; it hands
``Shm(key, offset, size)`` refs to peers, who map the segment read-only through
``ShmMapper`` and must be done with the bytes before the owner is told so (for a
frontend's input blocks: when the request's reply arrives). ``ShmMapper`` writes only
where asked to (a client's output region). Segments are mapped with ``mmap`` directly,
not ``multiprocessing.shared_memory`` (its resource tracker may unlink segments it does
not own).

Peers reach a segment by its name (a backend host maps a frontend's input segment, a
frontend maps a backend host's output segment, possibly from another container sharing
only the IPC namespace), so segments cannot be unlinked once mapped. Instead their names
are reserved (``is_reserved``: client registrations are refused them), carry 128 random
bits, and the files are mode 0600.

Every page of an arena block is reserved with ``posix_fallocate`` before the block is
handed out: on a full shm filesystem the request fails with UNAVAILABLE instead of the
process dying of SIGBUS when it touches the page.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import re
import stat
from collections import OrderedDict

from despina.common.errors import ServerError, invalid_arg, unavailable

# The shm filesystem: /dev/shm, as shm_open uses. DESPINA_SHM_DIR moves it (arenas and
# client regions alike), for tests and containers that mount a tmpfs elsewhere; every
# process of one server must see the same value. Set at start-up from the process's
# settings (common/settings.py ``ProcessSettings.apply``), before the first arena.
SHM_DIR = "/dev/shm"
_ALIGN = 64
# Names of arena segments: despina_<role>_<pid>_<random>_<n>. Client keys that look
# like one are refused, whether or not such a segment exists.
_RESERVED = re.compile(r"despina_[a-z]+_[0-9]+_")
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def arena_prefix(role: str) -> str:
    """Segment names carry the owner's pid, so a supervisor can remove the segments of a
    child that died without cleaning up (``remove_segments_of``), and 128 random bits, so
    nobody guesses them."""
    return f"despina_{role}_{os.getpid()}_{os.urandom(16).hex()}"


def is_reserved(key: str) -> bool:
    """Whether ``key`` (with or without shm_open's leading '/') names, or could name, an
    arena segment of a Despina process."""
    return _RESERVED.match(key[1:] if key.startswith("/") else key) is not None


def remove_segments_of(pid: int) -> int:
    """Unlink the arena segments a dead process left in the shm filesystem; returns how
    many."""
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
    """Path of a shared-memory object named ``key``; refuses names that leave the shm
    filesystem: one path component (shm_open's leading '/' allowed), no NUL, not '..'."""
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise invalid_arg(f"invalid shared memory key '{key}': it must name an object in {SHM_DIR}")
    return os.path.join(SHM_DIR, name)


class NotAnObject(OSError):
    """The key names something that is not a plain shared-memory object: a link, a
    directory, a fifo, a file on another filesystem, a file with other names."""


_shm_dev: int | None = None


def _plain(st: os.stat_result) -> bool:
    """A regular file with one name, on the shm filesystem."""
    global _shm_dev
    if _shm_dev is None:
        _shm_dev = os.stat(SHM_DIR).st_dev
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_dev == _shm_dev


def open_object(key: str, writable: bool = False) -> tuple[int, os.stat_result]:
    """Open the shared-memory object ``key`` as shm_open would, never following a link.

    The name is ``lstat``-ed first (nothing but a plain object is opened: no fifo, no
    device), then opened ``O_NOFOLLOW | O_NONBLOCK`` and ``fstat``-ed: it must be a
    regular file with one link on the shm filesystem, the very file ``lstat`` saw. The
    caller owns and closes the returned descriptor. Raises INVALID_ARG (``shm_path``)
    for a malformed key, FileNotFoundError, ``NotAnObject``, or another OSError
    (permissions, name too long): callers word the client's message.
    """
    path = shm_path(key)
    st = os.lstat(path)
    if not _plain(st):
        raise NotAnObject(errno.EINVAL, "not a plain shared memory object", key)
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | _OPEN_FLAGS)
    try:
        fst = os.fstat(fd)
        if not _plain(fst) or (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev):
            raise NotAnObject(errno.EINVAL, "replaced while being opened", key)
    except BaseException:
        os.close(fd)
        raise
    return fd, fst


def shm_full(size: int, exc: OSError) -> ServerError:
    """UNAVAILABLE (recoverable: this request fails, later ones may fit) for ``size``
    bytes that the shm filesystem could not reserve."""
    try:
        vfs = os.statvfs(SHM_DIR)
        total, free = vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize
        room = f"{total / 2**20:.0f} MiB in all, {free / 2**20:.1f} MiB free"
    except OSError:
        room = "size unknown"
    return unavailable(
        f"out of shared memory: {SHM_DIR} ({room}) cannot hold {size} more bytes "
        f"({os.strerror(exc.errno or errno.ENOSPC)}); give the server more shared memory "
        "(docker run --shm-size, compose shm_size) or send smaller requests"
    )


class _Segment:
    __slots__ = ("key", "size", "mm", "free", "fd", "reserved")

    def __init__(self, key: str, size: int) -> None:
        self.key = key
        self.size = size
        self.fd = os.open(shm_path(key), os.O_CREAT | os.O_EXCL | os.O_RDWR | _OPEN_FLAGS, 0o600)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            os.unlink(shm_path(key))
            raise
        # Pages [0, reserved) are allocated (posix_fallocate): touching them cannot
        # SIGBUS. First fit hands out low offsets first, so this only grows, rarely.
        self.reserved = 0
        # Sorted, non-overlapping free extents: offsets and their sizes.
        self.free: list[list[int]] = [[0, size]]

    def reserve(self, end: int) -> None:
        """Allocate the pages up to ``end``; raises UNAVAILABLE when the shm filesystem
        is full (what it could not reserve is given back by the kernel)."""
        if end > self.reserved:
            try:
                os.posix_fallocate(self.fd, self.reserved, end - self.reserved)
            except OSError as exc:
                raise shm_full(end - self.reserved, exc) from None
            self.reserved = end

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
        os.close(self.fd)
        try:
            os.unlink(shm_path(self.key))
        except FileNotFoundError:
            pass


class ShmArena:
    """Allocates blocks in segments named ``<prefix>_<n>``; one owner process.

    Not thread-safe. ``allocate`` returns (key, offset, writable view), every page of
    which is allocated, or raises UNAVAILABLE (recoverable) when the shm filesystem is
    full; ``release`` takes the key and offset back. A request larger than the segment
    size gets a segment of its own (rounded up to 16 MiB). Released, such a segment is kept for the next large
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
        if offset + size > seg.reserved:
            try:
                seg.reserve(offset + size)
            except ServerError:
                seg.release(offset, size)
                if seg.size != self.segment_size:
                    self._drop_or_keep(seg)
                raise
        self._sizes[(seg.key, offset)] = size
        return seg.key, offset, memoryview(seg.mm)[offset : offset + size]

    def _drop_or_keep(self, seg: _Segment) -> None:
        """A large segment whose block could not be reserved: kept idle if it holds
        reserved pages, else removed."""
        if seg.reserved:
            self._idle_large[seg.key] = seg
        else:
            del self._segments[seg.key]
            seg.close()

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

    Objects are opened with ``open_object`` only: never through a link, never anything
    but a plain object of the shm filesystem, so a client key swapped for a symlink
    after registration is refused here too. A view is read-only unless asked
    ``writable``: the object is then opened ``O_RDONLY`` and mapped ``PROT_READ``, so a
    reader cannot scribble on a client's input region, and an object the server may only
    read still serves as input. Read and write mappings are cached apart (one key may
    hold one of each) rather than one upgraded to read-write: an upgrade would hand
    later reads a writable mapping, and would have to unmap a mapping whose views may
    still be alive. ``write`` writes without a mapping at all.

    Each ``view`` and ``write`` checks the object as it is now (one ``lstat``): a key
    that no longer exists, an object replaced under the same key (by anything, a link
    included), or one shrunk below the block gives a clear INVALID_ARG instead of stale
    data or a SIGBUS. A client block's never-written pages are allocated before it is
    viewed (``_fill_holes``), so a full shm filesystem fails the request, not the
    process. What is left: a client that shrinks its own input region after this check,
    while the model still reads the view, can still SIGBUS the reader (no file seal
    exists for a named shm object); a ``write`` cannot be hurt that way.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        # (path, writable) -> (inode, mapping, its descriptor: kept for SEEK_HOLE)
        self._maps: OrderedDict[tuple[str, bool], tuple[int, mmap.mmap, int]] = OrderedDict()
        # path -> (inode, descriptor open for writing)
        self._writers: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def _check(self, key: str, path: str, offset: int, size: int) -> os.stat_result:
        """The object under ``path`` now, if it is plain and holds the block."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.forget(key)
            raise invalid_arg(
                f"shared memory object '{key}' does not exist (was it removed while registered?)"
            ) from None
        except OSError:
            raise _unusable(key) from None
        if not _plain(st):
            self.forget(key)
            raise _unusable(key)
        if offset < 0 or size < 0 or offset + size > st.st_size:
            raise invalid_arg(
                f"shared memory block [{offset}, {offset + size}) is outside '{key}' "
                f"of {st.st_size} bytes"
            )
        return st

    def view(self, key: str, offset: int, size: int, *, writable: bool = False) -> memoryview:
        """``size`` bytes at ``offset`` in object ``key``; a read-only memoryview unless
        ``writable``. Raises INVALID_ARG (recoverable: the request fails, the mapper
        stays usable) for a bad key, a missing or replaced object or a block outside it."""
        path = shm_path(key)
        st = self._check(key, path, offset, size)
        slot = (path, writable)
        cached = self._maps.get(slot)
        if cached is None or cached[0] != st.st_ino or len(cached[1]) < offset + size:
            cached = self._map(key, slot, offset + size)
        else:
            self._maps.move_to_end(slot)
        if size and not _RESERVED.match(key, key.startswith("/")):
            _fill_holes(key, path, cached[2], offset, size)
        return memoryview(cached[1])[offset : offset + size]

    def write(self, key: str, offset: int, data: bytes | memoryview) -> None:
        """Copy ``data`` to ``offset`` in object ``key`` with ``pwrite``: a client that
        shrinks its region meanwhile, or a full shm filesystem under a sparse region,
        fails this request (INVALID_ARG, UNAVAILABLE; recoverable) where a store into a
        mapping would kill the process with SIGBUS."""
        path = shm_path(key)
        size = len(data) if isinstance(data, bytes) else data.nbytes
        st = self._check(key, path, offset, size)
        cached = self._writers.get(path)
        if cached is None or cached[0] != st.st_ino:
            fd = self._open_writer(key, path, st)
        else:
            fd = cached[1]
            self._writers.move_to_end(path)
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        done = 0
        try:
            while done < size:
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise shm_full(size - done, exc) from None
            raise invalid_arg(f"shared memory object '{key}' cannot be written") from None

    def _open_writer(self, key: str, path: str, st: os.stat_result) -> int:
        cached = self._writers.pop(path, None)
        if cached is not None:
            os.close(cached[1])
        fd, fst = self._open(key, True)
        if fst.st_ino != st.st_ino:
            os.close(fd)
            raise _unusable(key)
        self._writers[path] = (fst.st_ino, fd)
        while len(self._writers) > self.capacity:
            _, (_, old) = self._writers.popitem(last=False)
            os.close(old)
        return fd

    def _open(self, key: str, writable: bool) -> tuple[int, os.stat_result]:
        try:
            return open_object(key, writable)
        except FileNotFoundError:
            raise invalid_arg(f"shared memory object '{key}' does not exist") from None
        except PermissionError:
            mode = "reading and writing" if writable else "reading"
            raise invalid_arg(f"shared memory object '{key}' cannot be opened for {mode}") from None
        except OSError:
            raise _unusable(key) from None

    def _map(self, key: str, slot: tuple[str, bool], end: int) -> tuple[int, mmap.mmap, int]:
        path, writable = slot
        cached = self._maps.pop(slot, None)
        if cached is not None:
            _close(cached[1], cached[2])
        fd, st = self._open(key, writable)
        try:
            if st.st_size < end:  # shrunk since the check
                raise invalid_arg(
                    f"shared memory block ending at {end} is outside '{key}' of {st.st_size} bytes"
                )
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            mm = mmap.mmap(fd, st.st_size, access=access)
        except BaseException:
            os.close(fd)
            raise
        entry = self._maps[slot] = (st.st_ino, mm, fd)
        while len(self._maps) > self.capacity:
            _, (_, old, old_fd) = self._maps.popitem(last=False)
            _close(old, old_fd)
        return entry

    def forget(self, key: str) -> None:
        """Drop the mappings and the write descriptor of ``key`` (live views keep their
        mapping until they go)."""
        path = shm_path(key)
        for writable in (False, True):
            cached = self._maps.pop((path, writable), None)
            if cached is not None:
                _close(cached[1], cached[2])
        writer = self._writers.pop(path, None)
        if writer is not None:
            os.close(writer[1])


def _unusable(key: str) -> ServerError:
    return invalid_arg(
        f"shared memory object '{key}' is no longer a plain shared memory object "
        "(was it replaced while registered?)"
    )


def _close(mm: mmap.mmap, fd: int) -> None:
    os.close(fd)
    try:
        mm.close()
    except BufferError:
        pass  # a view still uses it; it is unmapped when the last view goes


def _fill_holes(key: str, path: str, fd: int, offset: int, size: int) -> None:
    """Make sure the pages of [offset, offset + size) of a client's object exist.

    A client's region is sparse where the client never wrote (tritonclient creates
    regions with ftruncate): touching such a page through a mapping allocates it, and on
    a full shm filesystem that is a SIGBUS. One ``lseek(SEEK_HOLE)`` finds none in the
    usual case; a hole is filled with zeros (what reading it gives anyway) by
    ``posix_fallocate``, or the request fails: UNAVAILABLE when the filesystem is full,
    INVALID_ARG when the server may not write to the object.
    """
    end = offset + size
    try:
        if os.lseek(fd, offset, os.SEEK_HOLE) >= end:
            return
    except OSError:
        pass  # no SEEK_HOLE here: fill to be sure
    try:
        writer = os.open(path, os.O_WRONLY | _OPEN_FLAGS)
    except OSError:
        raise invalid_arg(
            f"shared memory block [{offset}, {end}) of '{key}' was never written and the "
            "server may not fill it: write the whole block before the request"
        ) from None
    try:
        mine, theirs = os.fstat(fd), os.fstat(writer)
        if (mine.st_ino, mine.st_dev) != (theirs.st_ino, theirs.st_dev):
            raise _unusable(key)  # replaced since it was mapped
        os.posix_fallocate(writer, offset, size)
    except OSError as exc:
        raise shm_full(size, exc) from None
    finally:
        os.close(writer)
