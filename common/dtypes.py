"""Triton data types: one table from type name to numpy dtype and item size, and the
BYTES length-prefix codec (each element is a 4-byte little-endian length, then bytes).

BF16 has no numpy dtype of its own here: it travels as raw 2-byte elements (``uint16``)
and backends that understand it reinterpret the bits.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from despina.common.errors import invalid_arg

if TYPE_CHECKING:
    import numpy as np

# numpy is imported on first use, not here: the scheduler checks sizes and names only,
# and numpy is ~15 MiB of RSS a process.

# name -> (numpy dtype name, or None for BYTES; item size in bytes, or 0 for variable)
_TABLE: dict[str, tuple[str | None, int]] = {
    "BOOL": ("bool", 1),
    "UINT8": ("uint8", 1),
    "UINT16": ("uint16", 2),
    "UINT32": ("uint32", 4),
    "UINT64": ("uint64", 8),
    "INT8": ("int8", 1),
    "INT16": ("int16", 2),
    "INT32": ("int32", 4),
    "INT64": ("int64", 8),
    "FP16": ("float16", 2),
    "FP32": ("float32", 4),
    "FP64": ("float64", 8),
    "BF16": ("uint16", 2),
    "BYTES": (None, 0),
}

# Filled with numpy dtypes on first use (``_numpy_tables``).
_TO_NUMPY: dict[str, np.dtype] = {}
_FROM_NUMPY: dict[np.dtype, str] = {}

TRITON_TYPES: tuple[str, ...] = tuple(_TABLE)


def _numpy_tables() -> None:
    global _TO_NUMPY, _FROM_NUMPY
    import numpy as np

    to_numpy = {
        name: np.dtype(np.object_ if numpy_name is None else numpy_name)
        for name, (numpy_name, _) in _TABLE.items()
    }
    # Whole tables at once: another thread never sees one half filled.
    _FROM_NUMPY = {dt: name for name, dt in to_numpy.items() if name not in ("BF16", "BYTES")}
    _TO_NUMPY = to_numpy


def is_known(datatype: str) -> bool:
    return datatype in _TABLE


def to_numpy(datatype: str) -> np.dtype:
    """Numpy dtype for a Triton type; BYTES maps to ``object`` (elements are ``bytes``)."""
    try:
        return _TO_NUMPY[datatype]
    except KeyError:
        if _TO_NUMPY:
            raise invalid_arg(f"unknown data type '{datatype}'") from None
    _numpy_tables()
    return to_numpy(datatype)


def from_numpy(dtype: np.dtype) -> str:
    """Triton type name for a numpy dtype; strings and objects are BYTES."""
    name = _FROM_NUMPY.get(dtype)  # type: ignore[call-overload]
    if name is not None:
        return name
    import numpy as np

    if not _FROM_NUMPY:
        _numpy_tables()
    dtype = np.dtype(dtype)
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return _FROM_NUMPY[dtype]
    except KeyError:
        raise invalid_arg(f"numpy dtype {dtype} has no Triton data type") from None


def item_size(datatype: str) -> int:
    """Bytes per element, 0 for BYTES (variable length)."""
    try:
        return _TABLE[datatype][1]
    except KeyError:
        raise invalid_arg(f"unknown data type '{datatype}'") from None


def from_config_type(config_type: str) -> str:
    """``TYPE_FP32`` (config.pbtxt spelling) -> ``FP32``; ``TYPE_STRING`` -> ``BYTES``."""
    name = config_type[5:] if config_type.startswith("TYPE_") else config_type
    return "BYTES" if name == "STRING" else name


def to_config_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def element_count(shape: list[int] | tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_LEN = struct.Struct("<I")


def serialize_bytes(array: np.ndarray) -> bytes:
    """Serialize a BYTES tensor (object array of bytes/str) into length-prefixed form."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray, memoryview)):
            item = str(item).encode("utf-8")
        parts.append(_LEN.pack(len(item)))
        parts.append(bytes(item))
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview, count: int | None = None) -> np.ndarray:
    """Parse length-prefixed elements into a 1-D object array of ``bytes``.

    Raises INVALID_ARG when the buffer is truncated or, when ``count`` is given, holds a
    different number of elements.
    """
    view = memoryview(buffer)
    items: list[bytes] = []
    pos, end = 0, len(view)
    while pos < end:
        if pos + 4 > end:
            raise invalid_arg("malformed BYTES data: truncated element length")
        (length,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + length > end:
            raise invalid_arg("malformed BYTES data: element runs past the end of the buffer")
        items.append(bytes(view[pos : pos + length]))
        pos += length
    if count is not None and len(items) != count:
        raise invalid_arg(f"expected {count} BYTES elements, got {len(items)}")
    import numpy as np

    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


def byte_size(datatype: str, shape: list[int] | tuple[int, ...]) -> int:
    """Expected byte size of a fixed-size tensor; -1 for BYTES."""
    size = item_size(datatype)
    return -1 if size == 0 else size * element_count(shape)


def check_bytes_elements(data: bytes | memoryview, count: int, name: str, shape: list[int]) -> None:
    """Walk the length prefixes of raw BYTES input ``name``: it must hold exactly
    ``count`` whole elements. Raises INVALID_ARG saying what is wrong."""
    pos, end, found = 0, len(data), 0
    while pos < end:
        if pos + 4 > end:
            raise invalid_arg(
                f"malformed BYTES data for input '{name}': the length of element {found} is "
                "cut off; each element is a 4-byte little-endian length, then its bytes"
            )
        (length,) = _LEN.unpack_from(data, pos)
        pos += 4 + length
        if pos > end:
            raise invalid_arg(
                f"malformed BYTES data for input '{name}': element {found} declares {length} "
                f"bytes, past the end of the input's {end} bytes"
            )
        found += 1
    if found != count:
        shown = "[" + ",".join(str(d) for d in shape) + "]"
        raise invalid_arg(
            f"unexpected number of string elements {found} for input '{name}', expecting "
            f"{count} for shape {shown}"
        )
