"""Client-registered system shared-memory regions (Triton's systemsharedmemory
extension): the registry, its bounds checks and its status documents.

The registry lives in the scheduler, so every frontend sees the same registrations
(Triton keeps them in its one server process). Registering opens the object as shm_open
would, without following links (``open_object``), and checks that it is a plain object
of the shm filesystem, large enough, and not one of Despina's own arena segments; every
refusal gets the one message of ``_refused``, so registration is no oracle for which
files exist, what they are or how large. A request names a region and an offset in it,
and ``resolve`` turns that into the object key and absolute offset the backend host
maps (read-only for an input, written with ``pwrite`` for an output: ``ShmMapper``,
which opens it the same safe way), refusing anything that leaves the region. The
scheduler itself only opens and ``fstat``s the object.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from despina.common import cuda
from despina.common.errors import Code, ServerError, invalid_arg, not_found
from despina.common.messages import CudaIpc, Shm
from despina.common.shm.arena import is_reserved, open_object

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int

    def status(self) -> dict:
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }


@dataclass(frozen=True, slots=True)
class CudaRegion:
    name: str
    raw_handle: bytes
    device_id: int
    byte_size: int

    def status(self) -> dict:
        return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}


class RegionRegistry:
    """System and CUDA regions, each name used once across both. Not thread-safe: the
    scheduler's loop owns it."""

    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}
        self._cuda: dict[str, CudaRegion] = {}

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        """Raises UNSUPPORTED without a usable GPU (common.cuda), ALREADY_EXISTS for a
        taken name, INVALID_ARG for a malformed handle or device."""
        if name in self._cuda or name in self._regions:
            raise ServerError(
                Code.ALREADY_EXISTS, f"shared memory region '{name}' already in manager"
            )
        cuda.check_handle(raw_handle, device_id, byte_size)
        self._cuda[name] = CudaRegion(name, raw_handle, device_id, byte_size)

    def unregister_cuda(self, name: str = "") -> None:
        if name:
            self._cuda.pop(name, None)
        else:
            self._cuda.clear()

    def cuda_status(self, name: str = "") -> list[dict]:
        if not name:
            return [r.status() for r in self._cuda.values()]
        region = self._cuda.get(name)
        if region is None:
            raise not_found(f"Unable to find cuda shared memory region: '{name}'")
        return [region.status()]

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        """Raises ALREADY_EXISTS for a taken name, INVALID_ARG for a negative offset or
        an empty region, and INVALID_ARG with one message, whatever the reason, for a key
        that is malformed, reserved, missing or not a plain object (a link, a directory, a
        fifo, a file with other names or on another filesystem); INVALID_ARG with Triton's
        "failed to register ... invalid args" for a usable object the region does not fit."""
        if not name:
            raise invalid_arg("a shared memory region needs a name")
        if name in self._regions or name in self._cuda:
            raise ServerError(
                Code.ALREADY_EXISTS, f"shared memory region '{name}' already in manager"
            )
        if offset < 0 or byte_size <= 0:
            raise _invalid_args(
                name,
                f"offset must be >= 0 and byte_size > 0, got offset {offset} and "
                f"byte_size {byte_size}",
            )
        reason, size = _unusable(key)
        if reason is not None:
            log.info("system shared memory region '%s' refused: key %r %s", name, key, reason)
            raise _refused(key)
        if offset + byte_size > size:
            raise _invalid_args(
                name,
                f"offset {offset} + byte_size {byte_size} is past the end of '{key}' "
                f"({size} bytes)",
            )
        region = Region(name, key, offset, byte_size)
        self._regions[name] = region
        return region

    def unregister(self, name: str = "") -> None:
        """One region, or every region when ``name`` is empty. Unknown names are fine."""
        if name:
            self._regions.pop(name, None)
        else:
            self._regions.clear()

    def status(self, name: str = "") -> list[dict]:
        if not name:
            return [r.status() for r in self._regions.values()]
        region = self._regions.get(name)
        if region is None:
            raise not_found(f"Unable to find system shared memory region: '{name}'")
        return [region.status()]

    def resolve(self, name: str, offset: int, size: int, what: str) -> Shm | CudaIpc:
        """The block of ``size`` bytes at ``offset`` in region ``name``, as the backend
        host reaches it. ``what`` names the tensor for the error messages."""
        region: Region | CudaRegion | None = self._regions.get(name) or self._cuda.get(name)
        if region is None:
            raise invalid_arg(f"Unable to find shared memory region: '{name}' (for {what})")
        if offset < 0 or offset >= region.byte_size:
            raise invalid_arg(
                f"Invalid offset for shared memory region: '{name}' (for {what}: offset "
                f"{offset}, region size {region.byte_size})"
            )
        if size < 0 or offset + size > region.byte_size:
            raise invalid_arg(
                f"Invalid offset + byte size for shared memory region: '{name}' (for {what}: "
                f"offset {offset} + byte size {size} > region size {region.byte_size})"
            )
        if isinstance(region, CudaRegion):
            return CudaIpc(region.raw_handle, region.device_id, offset, size)
        return Shm(region.key, region.offset + offset, size)

    def __len__(self) -> int:
        return len(self._regions)


def _refused(key: str) -> ServerError:
    """The one answer to a key that cannot be registered, whatever the reason."""
    return invalid_arg(f"Unable to open shared memory region: '{key}'")


def _invalid_args(name: str, why: str) -> ServerError:
    """Triton's words for a registration whose offset and size do not fit (its qa tests
    match "failed to register shared memory region.*invalid args"), then why."""
    return invalid_arg(f"failed to register shared memory region '{name}': invalid args ({why})")


def _unusable(key: str) -> tuple[str | None, int]:
    """(why ``key`` cannot be opened as a region, for the log, or None; its size)."""
    if is_reserved(key):
        return "is reserved for Despina's own segments", 0
    try:
        fd, st = open_object(key)
    except ServerError:
        return "is not a single name in the shm filesystem", 0
    except OSError as exc:
        return f"cannot be opened ({exc.strerror})", 0
    except ValueError:
        return "is not a valid name", 0
    os.close(fd)
    return None, st.st_size
