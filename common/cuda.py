"""CUDA IPC for GPU tensors (Triton's cudasharedmemory extension), through cupy.

A client registers device memory by its raw ``cudaIpcMemHandle_t`` (64 bytes) and device
id; the scheduler records it, and the backend host opens the handle once (cached) and
copies between that memory and the host buffers a CPU backend uses. GPU backends that
take device arrays directly are the backends issue's. Everything here needs an NVIDIA
GPU, its driver and cupy (``pip install 'despina[gpu]'``); without them ``require``
raises UNSUPPORTED saying so, and nothing imports cupy.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from despina.common.errors import Code, ServerError, invalid_arg

if TYPE_CHECKING:
    import numpy as np  # imported where used: the scheduler, which imports this, needs none

IPC_HANDLE_BYTES = 64
_NO_GPU = (
    "CUDA shared memory needs an NVIDIA GPU, its driver and cupy (pip install "
    "'despina[gpu]'); {why}. Use system shared memory instead"
)


@functools.cache
def _probe() -> str:
    """'' when CUDA is usable here, else why not. Imports cupy at most once."""
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError:
        return "cupy is not installed"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
    except Exception as exc:  # cupy raises its own CUDARuntimeError
        return f"the CUDA runtime is not usable ({exc})"
    return ""


def require() -> None:
    why = _probe()
    if why:
        raise ServerError(Code.UNSUPPORTED, _NO_GPU.format(why=why))


def check_handle(raw_handle: bytes, device_id: int, byte_size: int) -> None:
    require()
    if len(raw_handle) != IPC_HANDLE_BYTES:
        raise invalid_arg(
            f"a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes (cudaIpcMemHandle_t), got "
            f"{len(raw_handle)}"
        )
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    if not 0 <= device_id < count:
        raise invalid_arg(f"CUDA device {device_id} does not exist (this machine has {count})")
    if byte_size <= 0:
        raise invalid_arg("a CUDA shared memory region needs byte_size > 0")


class CudaMapper:
    """Opens CUDA IPC handles once per process and copies to and from them. One
    thread; the opened memory stays mapped until ``close``."""

    def __init__(self) -> None:
        self._opened: dict[tuple[bytes, int], int] = {}

    def _pointer(self, handle: bytes, device_id: int) -> int:
        key = (handle, device_id)
        ptr = self._opened.get(key)
        if ptr is None:
            require()
            import cupy

            with cupy.cuda.Device(device_id):
                try:
                    ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle)
                except Exception as exc:
                    raise invalid_arg(f"cannot open the CUDA IPC handle: {exc}") from None
            self._opened[key] = ptr
        return ptr

    def read(self, handle: bytes, device_id: int, offset: int, size: int) -> np.ndarray:
        """Copy ``size`` bytes at ``offset`` of the client's device memory to the host."""
        import cupy
        import numpy as np

        ptr = self._pointer(handle, device_id)
        host = np.empty(size, np.uint8)
        with cupy.cuda.Device(device_id):
            cupy.cuda.runtime.memcpy(host.ctypes.data, ptr + offset, size, 2)  # D2H
        return host

    def write(self, handle: bytes, device_id: int, offset: int, data: bytes | memoryview) -> None:
        """Copy host bytes into the client's device memory at ``offset``."""
        import cupy
        import numpy as np

        ptr = self._pointer(handle, device_id)
        host = np.frombuffer(data, np.uint8)
        with cupy.cuda.Device(device_id):
            cupy.cuda.runtime.memcpy(ptr + offset, host.ctypes.data, host.nbytes, 1)  # H2D

    def close(self) -> None:
        if not self._opened:
            return
        import cupy

        for ptr in self._opened.values():
            try:
                cupy.cuda.runtime.ipcCloseMemHandle(ptr)
            except Exception:
                pass
        self._opened.clear()
