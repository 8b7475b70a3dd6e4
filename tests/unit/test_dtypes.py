"""common/dtypes.py: the Triton type table, config spellings, sizes, and the BYTES codec."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from despina.common import dtypes
from despina.common.errors import Code, ServerError

# Triton name, numpy dtype, item size
TABLE = [
    ("BOOL", np.dtype(np.bool_), 1),
    ("UINT8", np.dtype(np.uint8), 1),
    ("UINT16", np.dtype(np.uint16), 2),
    ("UINT32", np.dtype(np.uint32), 4),
    ("UINT64", np.dtype(np.uint64), 8),
    ("INT8", np.dtype(np.int8), 1),
    ("INT16", np.dtype(np.int16), 2),
    ("INT32", np.dtype(np.int32), 4),
    ("INT64", np.dtype(np.int64), 8),
    ("FP16", np.dtype(np.float16), 2),
    ("FP32", np.dtype(np.float32), 4),
    ("FP64", np.dtype(np.float64), 8),
    ("BF16", np.dtype(np.uint16), 2),
    ("BYTES", np.dtype(np.object_), 0),
]
NAMES = [row[0] for row in TABLE]


def assert_invalid_arg(exc_info: pytest.ExceptionInfo[ServerError], *fragments: str) -> None:
    assert exc_info.value.code is Code.INVALID_ARG
    for fragment in fragments:
        assert fragment in exc_info.value.message


def test_table_lists_every_triton_type_once() -> None:
    assert sorted(dtypes.TRITON_TYPES) == sorted(NAMES)
    assert len(set(dtypes.TRITON_TYPES)) == len(dtypes.TRITON_TYPES)


@pytest.mark.parametrize(("name", "dtype", "size"), TABLE, ids=NAMES)
def test_to_numpy_and_item_size(name: str, dtype: np.dtype, size: int) -> None:
    assert dtypes.is_known(name)
    assert dtypes.to_numpy(name) == dtype
    assert dtypes.item_size(name) == size
    if size:
        assert dtypes.to_numpy(name).itemsize == size


@pytest.mark.parametrize(
    ("name", "dtype"),
    [(name, dtype) for name, dtype, _ in TABLE if name != "BF16"],
    ids=[n for n in NAMES if n != "BF16"],
)
def test_from_numpy_inverts_to_numpy(name: str, dtype: np.dtype) -> None:
    assert dtypes.from_numpy(dtype) == name
    assert dtypes.from_numpy(dtypes.to_numpy(name)) == name


def test_bf16_travels_as_uint16_and_maps_back_to_uint16() -> None:
    # BF16 has no numpy dtype: its bits travel as uint16, which is UINT16 going back.
    assert dtypes.to_numpy("BF16") == np.uint16
    assert dtypes.from_numpy(dtypes.to_numpy("BF16")) == "UINT16"


@pytest.mark.parametrize(
    "dtype",
    [np.dtype("S5"), np.dtype("U3"), np.dtype(object), np.dtype(np.bytes_), np.dtype(np.str_)],
    ids=str,
)
def test_strings_and_objects_are_bytes(dtype: np.dtype) -> None:
    assert dtypes.from_numpy(dtype) == "BYTES"


@pytest.mark.parametrize(
    "dtype", [np.complex64, np.complex128, np.dtype("M8[s]"), np.dtype("m8[s]")], ids=str
)
def test_from_numpy_without_triton_type_is_invalid_arg(dtype: object) -> None:
    with pytest.raises(ServerError) as exc_info:
        dtypes.from_numpy(np.dtype(dtype))  # type: ignore[call-overload]
    assert_invalid_arg(exc_info, "has no Triton data type")


@pytest.mark.parametrize("name", ["FLOAT32", "fp32", "", "TYPE_FP32", "STRING"])
def test_unknown_names_are_invalid_arg(name: str) -> None:
    assert not dtypes.is_known(name)
    for fn in (dtypes.to_numpy, dtypes.item_size):
        with pytest.raises(ServerError) as exc_info:
            fn(name)
        assert_invalid_arg(exc_info, f"unknown data type '{name}'")
    with pytest.raises(ServerError) as exc_info:
        dtypes.byte_size(name, [1])
    assert_invalid_arg(exc_info, name)


# --- config.pbtxt spellings ---------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_config_type_round_trip(name: str) -> None:
    config_type = dtypes.to_config_type(name)
    assert config_type == ("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")
    assert dtypes.from_config_type(config_type) == name


@pytest.mark.parametrize(
    ("config_type", "name"),
    [
        ("TYPE_STRING", "BYTES"),
        ("TYPE_FP32", "FP32"),
        ("TYPE_BF16", "BF16"),
        ("TYPE_BOOL", "BOOL"),
        ("FP32", "FP32"),  # already a protocol name: left as is
        ("STRING", "BYTES"),
    ],
)
def test_from_config_type(config_type: str, name: str) -> None:
    assert dtypes.from_config_type(config_type) == name


def test_bytes_config_spelling_is_type_string() -> None:
    assert dtypes.to_config_type("BYTES") == "TYPE_STRING"
    assert dtypes.from_config_type("TYPE_STRING") == "BYTES"


# --- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "count"),
    [([], 1), ((), 1), ([0], 0), ([3], 3), ([2, 3], 6), ((2, 3, 4), 24), ([5, 0, 7], 0)],
)
def test_element_count(shape: list[int], count: int) -> None:
    assert dtypes.element_count(shape) == count


@pytest.mark.parametrize(
    ("datatype", "shape", "size"),
    [
        ("FP32", [1, 16], 64),
        ("FP32", [], 4),
        ("FP64", [2, 3], 48),
        ("INT8", [7], 7),
        ("BOOL", [4, 4], 16),
        ("FP16", [3], 6),
        ("BF16", [3], 6),
        ("UINT64", [0, 5], 0),
        ("INT64", (2, 2), 32),
        ("BYTES", [4], -1),
        ("BYTES", [], -1),
    ],
)
def test_byte_size(datatype: str, shape: list[int], size: int) -> None:
    assert dtypes.byte_size(datatype, shape) == size


@pytest.mark.parametrize(("name", "dtype", "size"), TABLE[:-1], ids=NAMES[:-1])
def test_byte_size_matches_numpy(name: str, dtype: np.dtype, size: int) -> None:
    array = np.zeros((3, 5), dtype=dtypes.to_numpy(name))
    assert dtypes.byte_size(name, array.shape) == array.nbytes


# --- the BYTES codec --------------------------------------------------------------------


def prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


@pytest.mark.parametrize(
    "items",
    [
        [],
        [b""],
        [b"", b"", b""],
        [b"abc"],
        [b"a", b"", b"bc"],
        ["héllo".encode(), "日本語".encode(), "🙂".encode()],
        [b"\x00", b"a\x00b", b"\x00\x00\x00\x00"],
        [bytes(range(256))],
        [b"x" * 70000],
    ],
    ids=[
        "none",
        "one-empty",
        "all-empty",
        "ascii",
        "mixed",
        "non-ascii",
        "nuls",
        "all-bytes",
        "long",
    ],
)
def test_bytes_round_trip(items: list[bytes]) -> None:
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    wire = dtypes.serialize_bytes(array)
    assert wire == prefixed(*items)
    out = dtypes.deserialize_bytes(wire, count=len(items))
    assert out.dtype == np.object_
    assert out.shape == (len(items),)
    assert list(out) == items
    assert all(type(x) is bytes for x in out)


def test_serialize_accepts_str_bytes_bytearray_and_memoryview() -> None:
    array = np.empty(5, dtype=np.object_)
    array[:] = ["héllo", b"h\xc3\xa9llo", bytearray(b"ba"), memoryview(b"mv"), "a\x00b"]
    wire = dtypes.serialize_bytes(array)
    assert wire == prefixed("héllo".encode(), "héllo".encode(), b"ba", b"mv", b"a\x00b")
    assert list(dtypes.deserialize_bytes(wire)) == [
        "héllo".encode(),
        "héllo".encode(),
        b"ba",
        b"mv",
        b"a\x00b",
    ]


def test_serialize_other_objects_uses_their_str() -> None:
    array = np.array([1, 2.5, None], dtype=np.object_)
    assert dtypes.serialize_bytes(array) == prefixed(b"1", b"2.5", b"None")


def test_serialize_numpy_fixed_width_strings() -> None:
    # numpy's fixed-width byte strings drop trailing NULs; unicode arrays encode UTF-8.
    assert dtypes.serialize_bytes(np.array([b"ab", b"c"], dtype="S2")) == prefixed(b"ab", b"c")
    assert dtypes.serialize_bytes(np.array(["é", "ab"])) == prefixed("é".encode(), b"ab")


def test_serialize_flattens_in_c_order() -> None:
    array = np.array([[b"a", b"b"], [b"c", b"d"]], dtype=np.object_)
    wire = dtypes.serialize_bytes(array)
    assert wire == prefixed(b"a", b"b", b"c", b"d")
    assert list(dtypes.deserialize_bytes(wire, count=4)) == [b"a", b"b", b"c", b"d"]


def test_deserialize_memoryview_slice() -> None:
    wire = b"JUNK" + prefixed(b"x", b"yz") + b"TAIL"
    view = memoryview(wire)[4:-4]
    assert list(dtypes.deserialize_bytes(view, count=2)) == [b"x", b"yz"]


@pytest.mark.parametrize(
    ("wire", "fragment"),
    [
        (b"\x01", "truncated element length"),
        (b"\x01\x00\x00", "truncated element length"),
        (prefixed(b"ok") + b"\x00\x00", "truncated element length"),
        (struct.pack("<I", 5) + b"abcd", "runs past the end"),
        (struct.pack("<I", 1), "runs past the end"),
        (prefixed(b"ok") + struct.pack("<I", 2**32 - 1) + b"x", "runs past the end"),
        (struct.pack("<I", 100) + b"short", "runs past the end"),
    ],
    ids=[
        "1-byte-length",
        "3-byte-length",
        "trailing-partial-length",
        "one-byte-short",
        "length-without-data",
        "huge-length",
        "overlong-length",
    ],
)
def test_deserialize_malformed_is_invalid_arg(wire: bytes, fragment: str) -> None:
    with pytest.raises(ServerError) as exc_info:
        dtypes.deserialize_bytes(wire)
    assert_invalid_arg(exc_info, "malformed BYTES data", fragment)


@pytest.mark.parametrize(
    ("items", "count"),
    [([b"a", b"b"], 3), ([b"a", b"b"], 1), ([], 1), ([b""], 0), ([b"", b""], 1)],
)
def test_deserialize_count_mismatch_is_invalid_arg(items: list[bytes], count: int) -> None:
    with pytest.raises(ServerError) as exc_info:
        dtypes.deserialize_bytes(prefixed(*items), count=count)
    assert_invalid_arg(exc_info, f"expected {count} BYTES elements, got {len(items)}")


def test_deserialize_without_count_accepts_any_number() -> None:
    assert len(dtypes.deserialize_bytes(prefixed(b"a", b"b", b"c"))) == 3
    assert len(dtypes.deserialize_bytes(b"")) == 0


# -- bounds (issue #12): shapes numpy can't build, BYTES element walks ------------------


@pytest.mark.parametrize(
    "shape",
    [[0, 2**62], [0, 2**63 - 1], [2**31, 2**31, 0, 2**31], [2**60], [2**30, 2**30]],
)
def test_check_shape_refuses_what_numpy_cannot_build(shape: list[int]) -> None:
    with pytest.raises(ServerError) as info:
        dtypes.check_shape("IN", shape, dtypes.element_count(shape))
    assert info.value.code is Code.INVALID_ARG
    message = info.value.message
    if dtypes.element_span(shape) > dtypes.INT64_MAX:  # Triton's words for each case
        assert message.startswith("input 'IN' shape [")
        assert message.endswith(
            "causes total element count to exceed maximum size of " + str(dtypes.INT64_MAX)
        )
    else:
        assert message.startswith("byte size overflow for input 'IN': shape [")
        assert f"spans more than {dtypes.MAX_ELEMENTS} elements" in message
    with pytest.raises(ValueError):  # what the backend host would have hit
        np.empty(shape, dtype=np.float64)


@pytest.mark.parametrize("shape", [[0, 2**59], [2**59], [0], [], [2**29, 2**30]])
def test_check_shape_accepts_what_numpy_can_build(shape: list[int]) -> None:
    dtypes.check_shape("IN", shape, dtypes.element_count(shape))
    assert dtypes.element_span(shape) <= dtypes.MAX_ELEMENTS
    if dtypes.element_count(shape) == 0:
        assert np.empty(shape, dtype=np.float64).size == 0


def test_check_dims_allows_numpys_64() -> None:
    dtypes.check_dims("IN", 64)
    with pytest.raises(ServerError) as info:
        dtypes.check_dims("IN", 65)
    assert info.value.message == (
        "unable to parse 'shape' of input 'IN': it has 65 dimensions, more than the 64 a "
        "tensor may have"
    )


def _bytes_error(data: bytes, count: int) -> str:
    with pytest.raises(ServerError) as info:
        dtypes.check_bytes_elements(data, count, "S", [count])
    assert info.value.code is Code.INVALID_ARG
    return info.value.message


def test_millions_of_zero_length_elements_check_in_milliseconds() -> None:
    import time

    count = 8 << 20  # 32 MiB of zero lengths: the Python walk took ~1.7 s
    data = bytes(4 * count)
    dtypes.check_bytes_elements(data, count, "S", [count])  # warm numpy up
    start = time.perf_counter()
    dtypes.check_bytes_elements(data, count, "S", [count])
    dtypes.check_bytes_elements(memoryview(data), count, "S", [count])
    assert time.perf_counter() - start < 0.5  # ~2 ms here; generous for a loaded VM
    # a count off by one is no longer one length: walked (past WALK_ELEMENTS, the
    # backend host's deserialize_bytes counts); small, the walk says how many
    assert _bytes_error(bytes(4000), 999) == (
        "unexpected number of string elements for input 'S': more than 999 (4 bytes follow "
        "element 998), expecting 999 for shape [999]"
    )
    assert _bytes_error(data, count + 1) == (
        f"unexpected number of string elements for input 'S': its {4 * count} bytes hold at "
        f"most {count}, expecting {count + 1} for shape [{count + 1}]; each element is a "
        "4-byte little-endian length, then its bytes"
    )


def test_uniform_length_elements_are_checked_and_parsed_by_numpy() -> None:
    items = [b"ab\x00", b"\x00\x00\x00", b"xyz"] * 1000
    data = dtypes.serialize_bytes(np.array(items, dtype=np.object_))
    dtypes.check_bytes_elements(data, len(items), "S", [len(items)])
    parsed = dtypes.deserialize_bytes(data, len(items))
    assert parsed.dtype == np.object_ and parsed.tolist() == items
    zeros = dtypes.deserialize_bytes(bytes(4 * 5), 5)
    assert zeros.tolist() == [b""] * 5
    # one length field off: not uniform, the walk finds what is wrong
    bad = bytearray(data)
    bad[7] = 4  # element 0 now declares 4 bytes
    assert "unexpected number of string elements" in _bytes_error(bytes(bad), len(items)) or (
        "malformed BYTES data" in _bytes_error(bytes(bad), len(items))
    )


def test_mixed_length_walk_is_bounded() -> None:
    import time

    count = 4 << 20  # lengths 0,1,0,1...: no one length, the walk stops at WALK_ELEMENTS
    data = b"\x00\x00\x00\x00\x01\x00\x00\x00a" * (count // 2)
    start = time.perf_counter()
    dtypes.check_bytes_elements(data, count, "S", [count])  # the rest is the backend's
    assert time.perf_counter() - start < 0.5  # ~4 ms here; the full walk took ~0.9 s
    with pytest.raises(ServerError, match="expected 4194304 BYTES elements, got 4194303"):
        dtypes.deserialize_bytes(data[:-5], count)


def test_walk_reports_extra_elements_without_counting_them() -> None:
    data = b"\x01\x00\x00\x00a" * 3
    assert _bytes_error(data, 2) == (
        "unexpected number of string elements for input 'S': more than 2 (5 bytes follow "
        "element 1), expecting 2 for shape [2]"
    )
    assert _bytes_error(data, 4) == (
        "unexpected number of string elements 3 for input 'S', expecting 4 for shape [4]"
    )
    assert "more than 0" in _bytes_error(data, 0)
