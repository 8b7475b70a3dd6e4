"""Triton data types: one table from type name to numpy dtype and item size, and the
BYTES length-prefix codec (each element is a 4-byte little-endian length, then bytes).

BF16 has no numpy dtype of its own here: it travels as raw 2-byte elements (``uint16``)
and backends that understand it reinterpret the bits.
"""

from __future__ import annotations

import struct

import numpy as np

from despina.common.errors import invalid_arg

# name -> (numpy dtype or None for BYTES, item size in bytes or 0 for variable)
_TABLE: dict[str, tuple[np.dtype | None, int]] = {
    "BOOL": (np.dtype(np.bool_), 1),
    "UINT8": (np.dtype(np.uint8), 1),
    "UINT16": (np.dtype(np.uint16), 2),
    "UINT32": (np.dtype(np.uint32), 4),
    "UINT64": (np.dtype(np.uint64), 8),
    "INT8": (np.dtype(np.int8), 1),
    "INT16": (np.dtype(np.int16), 2),
    "INT32": (np.dtype(np.int32), 4),
    "INT64": (np.dtype(np.int64), 8),
    "FP16": (np.dtype(np.float16), 2),
    "FP32": (np.dtype(np.float32), 4),
    "FP64": (np.dtype(np.float64), 8),
    "BF16": (np.dtype(np.uint16), 2),
    "BYTES": (None, 0),
}

_FROM_NUMPY: dict[np.dtype, str] = {
    dt: name for name, (dt, _) in _TABLE.items() if dt is not None and name != "BF16"
}

TRITON_TYPES: tuple[str, ...] = tuple(_TABLE)


def is_known(datatype: str) -> bool:
    return datatype in _TABLE


def to_numpy(datatype: str) -> np.dtype:
    """Numpy dtype for a Triton type; BYTES maps to ``object`` (elements are ``bytes``)."""
    try:
        dt = _TABLE[datatype][0]
    except KeyError:
        raise invalid_arg(f"unknown data type '{datatype}'") from None
    return np.dtype(np.object_) if dt is None else dt


def from_numpy(dtype: np.dtype) -> str:
    """Triton type name for a numpy dtype; strings and objects are BYTES."""
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
