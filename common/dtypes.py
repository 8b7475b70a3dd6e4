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


# The most elements a tensor's shape may span: 2**59 of 8 bytes (the widest item, and
# numpy's object pointer) is 2**62 bytes, within what numpy can index (2**63 - 1). Numpy
# refuses a shape whose non-zero dimensions multiply past that even when another
# dimension is 0 ([0, 2**62] holds no element, yet no array has that shape).
MAX_ELEMENTS = 1 << 59
INT64_MAX = (1 << 63) - 1  # Triton counts elements in int64: its words past that.


# The most dimensions a tensor may have: numpy's own limit (NPY_MAXDIMS in numpy 2).
MAX_DIMS = 64


def check_dims(name: str, dims: int) -> None:
    """Refuse input ``name`` with more than ``MAX_DIMS`` dimensions, before anything
    walks them. Raises INVALID_ARG naming the input."""
    if dims > MAX_DIMS:
        raise invalid_arg(
            f"unable to parse 'shape' of input '{name}': it has {dims} dimensions, more than "
            f"the {MAX_DIMS} a tensor may have"
        )


def element_span(shape: list[int] | tuple[int, ...]) -> int:
    """The product of ``shape``'s non-zero dimensions (Python ints: no overflow)."""
    n = 1
    for d in shape:
        if d:
            n *= d
    return n


def check_shape(name: str, shape: list[int] | tuple[int, ...], count: int) -> None:
    """Refuse input ``name`` whose shape spans more than ``MAX_ELEMENTS`` (``count``: its
    element count, already computed by the caller). O(1) unless ``count`` is 0. Raises
    INVALID_ARG naming the input; only that request fails."""
    span = count or element_span(shape)
    if span <= MAX_ELEMENTS:
        return
    shown = "[" + ",".join(str(d) for d in shape) + "]"
    if span > INT64_MAX:
        raise invalid_arg(
            f"input '{name}' shape {shown} causes total element count to exceed maximum "
            f"size of {INT64_MAX}"
        )
    raise invalid_arg(
        f"byte size overflow for input '{name}': shape {shown} spans more than "
        f"{MAX_ELEMENTS} elements (the product of its non-zero dimensions); no tensor can "
        "have that shape"
    )


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
    different number of elements. Elements all of one length (zero-length ones included)
    are parsed by numpy, in milliseconds for millions of them.
    """
    import numpy as np

    if count is not None:
        uniform = _uniform_length(buffer, count)
        if uniform is not None:
            out = np.empty(count, dtype=np.object_)
            if uniform == 0:
                out.fill(b"")
            else:
                fields = np.ndarray(
                    (count,), f"V{uniform}", buffer, offset=4, strides=(4 + uniform,)
                )
                out[:] = fields.tolist()
            return out
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


def _uniform_length(data: bytes | memoryview, count: int) -> int | None:
    """L when ``data`` is exactly ``count`` elements of L bytes each, else None (not
    that form: the caller walks the elements). Numpy reads the ``count`` length prefixes
    at their stride in one pass; no Python loop per element."""
    end = len(data) if type(data) is bytes else memoryview(data).nbytes
    if count <= 0 or count * 4 > end:
        return None
    rest = end - 4 * count
    if rest % count:
        return None
    length = rest // count
    if length > 0xFFFFFFFF:
        return None
    import numpy as np

    prefixes = np.ndarray((count,), "<u4", data, strides=(4 + length,))
    return length if bool((prefixes == length).all()) else None


def byte_size(datatype: str, shape: list[int] | tuple[int, ...]) -> int:
    """Expected byte size of a fixed-size tensor; -1 for BYTES."""
    size = item_size(datatype)
    return -1 if size == 0 else size * element_count(shape)


# Elements of differing lengths that ``check_bytes_elements`` walks one by one in
# Python (~0.2 µs each): past this many, the walk would hold the frontend's loop for
# milliseconds, so it is left to the backend host, which parses every element anyway
# (``deserialize_bytes`` checks the count) and fails only that request.
WALK_ELEMENTS = 1 << 14


def check_bytes_elements(data: bytes | memoryview, count: int, name: str, shape: list[int]) -> None:
    """Check that raw BYTES input ``name`` holds exactly ``count`` whole elements.
    Raises INVALID_ARG saying what is wrong.

    Bounded cost, whatever the client sends: elements all of one length (millions of
    zero-length ones included) are checked by numpy in one pass; a large buffer too short
    for ``count`` length prefixes is refused at once; otherwise at most
    ``WALK_ELEMENTS`` elements are walked in Python, and when ``count`` is larger than
    that and those are whole, the rest is left to the backend host."""
    end = len(data) if type(data) is bytes else memoryview(data).nbytes
    if count and count * 4 <= end and _uniform_length(data, count) is not None:
        return
    shown = "[" + ",".join(str(d) for d in shape) + "]"
    if count * 4 > end and end > 4 * WALK_ELEMENTS:
        raise invalid_arg(
            f"unexpected number of string elements for input '{name}': its {end} bytes hold "
            f"at most {end // 4}, expecting {count} for shape {shown}; each element is a "
            "4-byte little-endian length, then its bytes"
        )
    limit = min(count, WALK_ELEMENTS)
    pos, found = 0, 0
    while pos < end and found < limit:
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
    if pos == end:
        if found == count:
            return
        raise invalid_arg(
            f"unexpected number of string elements {found} for input '{name}', expecting "
            f"{count} for shape {shown}"
        )
    if count > WALK_ELEMENTS:
        return  # the backend host parses the rest, checking the count
    raise invalid_arg(
        f"unexpected number of string elements for input '{name}': more than {count} "
        f"({end - pos} bytes follow element {count - 1 if count else 'none'}), expecting "
        f"{count} for shape {shown}"
    )
