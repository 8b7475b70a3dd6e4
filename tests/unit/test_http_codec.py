"""The HTTP codec: KServe v2 JSON and Triton's binary tensor extension, both ways."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import orjson
import pytest

from despina.common import dtypes
from despina.common.errors import Code, ServerError
from despina.services.frontend.http.codec import (
    decode_infer_request,
    decode_raw_request,
    encode_error,
    encode_infer_response,
    encode_infer_response_parts,
    parse_header_length,
)
from despina.services.frontend.inference import (
    InferenceRequest,
    InferenceResult,
    OutputRequest,
    OutputTensor,
    RequestMemo,
)

from conftest import request_fields

# datatype, JSON values, the array those values stand for
TYPES = [
    ("BOOL", [True, False, True], np.array([True, False, True])),
    ("UINT8", [0, 7, 255], np.array([0, 7, 255], np.uint8)),
    ("UINT16", [0, 65535], np.array([0, 65535], np.uint16)),
    ("UINT32", [0, 2**32 - 1], np.array([0, 2**32 - 1], np.uint32)),
    ("UINT64", [0, 2**64 - 1], np.array([0, 2**64 - 1], np.uint64)),
    ("INT8", [-128, 0, 127], np.array([-128, 0, 127], np.int8)),
    ("INT16", [-32768, 32767], np.array([-32768, 32767], np.int16)),
    ("INT32", [-(2**31), 2**31 - 1], np.array([-(2**31), 2**31 - 1], np.int32)),
    ("INT64", [-(2**63), 2**63 - 1], np.array([-(2**63), 2**63 - 1], np.int64)),
    ("FP16", [1.5, -2.0, 0.25], np.array([1.5, -2.0, 0.25], np.float16)),
    ("FP32", [0.5, -1.25, 3.0], np.array([0.5, -1.25, 3.0], np.float32)),
    ("FP64", [0.1, 1e300, -2.5], np.array([0.1, 1e300, -2.5], np.float64)),
    # BF16 travels as uint16 bits; these values are exact in bfloat16.
    ("BF16", [1.0, -2.5, 0.5], np.array([0x3F80, 0xC020, 0x3F00], np.uint16)),
    ("BYTES", ["a", "", "héllo"], np.array([b"a", b"", "héllo".encode()], np.object_)),
]
TYPE_IDS = [t[0] for t in TYPES]


def raw(datatype: str, array: np.ndarray) -> bytes:
    return dtypes.serialize_bytes(array) if datatype == "BYTES" else array.tobytes()


def request_body(doc: dict, *blobs: bytes) -> tuple[bytes, int | None]:
    header = orjson.dumps(doc)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def decode(doc: dict, *blobs: bytes):
    body, header_length = request_body(doc, *blobs)
    return decode_infer_request(body, header_length, "m", "1")


def one_input(datatype: str, shape: list, **fields) -> dict:
    return {"inputs": [{"name": "INPUT0", "datatype": datatype, "shape": shape, **fields}]}


def split_response(body: bytes, header_length: int | None) -> tuple[dict, bytes]:
    if header_length is None:
        return orjson.loads(body), b""
    return orjson.loads(body[:header_length]), body[header_length:]


def result_of(*outputs: OutputTensor, **fields) -> InferenceResult:
    return InferenceResult(model="m", version="1", id="", outputs=list(outputs), **fields)


def request_of(outputs: list[OutputRequest] | None = None, **fields) -> InferenceRequest:
    return InferenceRequest(
        model="m", version="", id="", inputs=[], outputs=outputs or [], **fields
    )


# -- every datatype, both ways ---------------------------------------------------------


@pytest.mark.parametrize(("datatype", "values", "array"), TYPES, ids=TYPE_IDS)
def test_json_input_decodes_to_raw_bytes(datatype, values, array):
    req = decode(one_input(datatype, [len(values)], data=values))
    (tensor,) = req.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("INPUT0", datatype, [len(values)])
    assert bytes(tensor.data) == raw(datatype, array)
    assert tensor.parameters == {}


@pytest.mark.parametrize(("datatype", "values", "array"), TYPES, ids=TYPE_IDS)
def test_binary_input_is_a_zero_copy_slice(datatype, values, array):
    blob = raw(datatype, array)
    doc = one_input(datatype, [len(values)], parameters={"binary_data_size": len(blob)})
    body, header_length = request_body(doc, blob)
    (tensor,) = decode_infer_request(body, header_length, "m", "1").inputs
    assert isinstance(tensor.data, memoryview)
    assert tensor.data.obj is body
    assert bytes(tensor.data) == blob
    assert tensor.parameters == {}  # binary_data_size is consumed by the codec


@pytest.mark.parametrize(("datatype", "values", "array"), TYPES, ids=TYPE_IDS)
def test_json_output_encodes_flat_values(datatype, values, array):
    out = OutputTensor("OUT", datatype, [1, len(values)], raw(datatype, array))
    body, header_length = encode_infer_response(result_of(out), request_of())
    assert header_length is None
    (entry,) = orjson.loads(body)["outputs"]
    assert entry == {"name": "OUT", "datatype": datatype, "shape": [1, len(values)], "data": values}


@pytest.mark.parametrize(("datatype", "values", "array"), TYPES, ids=TYPE_IDS)
def test_binary_output_follows_the_json(datatype, values, array):
    blob = raw(datatype, array)
    out = OutputTensor("OUT", datatype, [len(values)], memoryview(blob))
    request = request_of([OutputRequest("OUT", binary=True)])
    body, header_length = encode_infer_response(result_of(out), request)
    doc, tail = split_response(body, header_length)
    assert doc["outputs"] == [
        {
            "name": "OUT",
            "datatype": datatype,
            "shape": [len(values)],
            "parameters": {"binary_data_size": len(blob)},
        }
    ]
    assert tail == blob


def test_fp32_json_round_trips_through_float32():
    values = [0.1, 1 / 3, -7.7]
    (tensor,) = decode(one_input("FP32", [3], data=values)).inputs
    out = OutputTensor("OUT", "FP32", [3], tensor.data)
    body, _ = encode_infer_response(result_of(out), request_of())
    returned = orjson.loads(body)["outputs"][0]["data"]
    np.testing.assert_array_equal(np.array(returned, np.float32), np.array(values, np.float32))


# -- nesting and shapes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "shape"),
    [
        ([1, 2, 3, 4, 5, 6], [2, 3]),
        ([[1, 2, 3], [4, 5, 6]], [2, 3]),
        ([[[1], [2], [3]], [[4], [5], [6]]], [2, 3]),
        ([[1, 2], [3, 4, 5], [6]], [2, 3]),  # ragged: Triton only counts elements
        ([[1, 2, 3], 4, [[5, 6]]], [6]),
    ],
    ids=["flat", "nested", "deeper", "ragged", "mixed"],
)
def test_nested_and_flat_data_decode_the_same(data, shape):
    (tensor,) = decode(one_input("INT32", shape, data=data)).inputs
    assert bytes(tensor.data) == np.arange(1, 7, dtype=np.int32).tobytes()
    assert tensor.shape == shape


def test_nested_bytes_data():
    (tensor,) = decode(one_input("BYTES", [2, 2], data=[["a", "b"], ["c", "dé"]])).inputs
    assert list(dtypes.deserialize_bytes(tensor.data)) == [b"a", b"b", b"c", "dé".encode()]


@pytest.mark.parametrize("datatype", ["INT32", "FP32", "BOOL", "BYTES"])
def test_zero_element_inputs(datatype):
    (tensor,) = decode(one_input(datatype, [0, 3], data=[])).inputs
    assert bytes(tensor.data) == b""
    doc = one_input(datatype, [2, 0], parameters={"binary_data_size": 0})
    (tensor,) = decode_infer_request(orjson.dumps(doc), len(orjson.dumps(doc)), "m", "1").inputs
    assert bytes(tensor.data) == b""


def test_ints_widen_to_floats():
    (tensor,) = decode(one_input("FP64", [3], data=[1, 2.5, -3])).inputs
    assert np.frombuffer(tensor.data, np.float64).tolist() == [1.0, 2.5, -3.0]


def test_bf16_json_input_rounds_to_nearest_even():
    # 1 + 2**-8 sits exactly between two bfloat16 values; ties go to the even one (1.0).
    (tensor,) = decode(one_input("BF16", [2], data=[1 + 2**-8, 1 + 3 * 2**-8])).inputs
    assert np.frombuffer(tensor.data, np.uint16).tolist() == [0x3F80, 0x3F82]


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "BF16"])
def test_json_floats_beyond_range_become_inf(datatype):
    doc = one_input(datatype, [2], data=[1e39, -1e39])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        (tensor,) = decode(doc).inputs
    expected = {
        "FP16": [0x7C00, 0xFC00],
        "FP32": [0x7F800000, 0xFF800000],
        "BF16": [0x7F80, 0xFF80],
    }
    bits = np.frombuffer(tensor.data, np.uint32 if datatype == "FP32" else np.uint16)
    assert bits.tolist() == expected[datatype]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ServerError) as err:
            decode(doc)
    assert err.value.code is Code.INVALID_ARG
    assert "'INPUT0'" in err.value.message


# -- requests: binary layout, parameters, outputs ---------------------------------------


def test_binary_and_json_inputs_mix_in_order():
    a = np.arange(4, dtype=np.float32)
    b = np.array([b"xy", b"z"], np.object_)
    doc = {
        "inputs": [
            {"name": "A", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}},
            {"name": "J", "datatype": "INT64", "shape": [2], "data": [7, 8]},
            {
                "name": "B",
                "datatype": "BYTES",
                "shape": [2],
                "parameters": {"binary_data_size": 11},
            },
        ]
    }
    req = decode(doc, a.tobytes(), dtypes.serialize_bytes(b))
    assert [t.name for t in req.inputs] == ["A", "J", "B"]
    assert bytes(req.inputs[0].data) == a.tobytes()
    assert bytes(req.inputs[1].data) == np.array([7, 8], np.int64).tobytes()
    assert list(dtypes.deserialize_bytes(req.inputs[2].data)) == [b"xy", b"z"]


def test_request_fields_and_parameters():
    doc = {
        "id": "req-7",
        "parameters": {
            "binary_data_output": True,
            "sequence_id": 42,
            "sequence_start": True,
            "priority": 2,
            "custom": "x",
            "ratio": 0.5,
        },
        "inputs": [],
        "outputs": [
            {"name": "A"},
            {"name": "B", "parameters": {"binary_data": True}},
            {"name": "C", "parameters": {"binary_data": False, "classification": 3}},
            {
                "name": "D",
                "parameters": {
                    "shared_memory_region": "out",
                    "shared_memory_byte_size": 64,
                    "shared_memory_offset": 0,
                },
            },
        ],
    }
    req = decode(doc)
    assert (req.model, req.version, req.id) == ("m", "1", "req-7")
    assert req.binary_output is True
    assert req.parameters == {
        "sequence_id": 42,
        "sequence_start": True,
        "priority": 2,
        "custom": "x",
        "ratio": 0.5,
    }
    assert req.outputs == [
        OutputRequest("A", False, {}),
        OutputRequest("B", True, {}),
        OutputRequest("C", False, {"classification": 3}),
        OutputRequest(
            "D",
            False,
            {
                "shared_memory_region": "out",
                "shared_memory_byte_size": 64,
                "shared_memory_offset": 0,
            },
        ),
    ]


def test_defaults_when_fields_are_absent():
    req = decode({"inputs": []})
    assert (req.id, req.parameters, req.outputs, req.binary_output) == ("", {}, [], False)


def test_string_sequence_id_is_accepted():
    assert decode({"parameters": {"sequence_id": "abc"}, "inputs": []}).parameters == {
        "sequence_id": "abc"
    }


def test_shared_memory_input_keeps_its_parameters():
    params = {
        "shared_memory_region": "in0",
        "shared_memory_byte_size": 64,
        "shared_memory_offset": 8,
    }
    (tensor,) = decode(one_input("FP32", [16], parameters=params)).inputs
    assert tensor.data is None
    assert tensor.parameters == params


def test_json_header_may_be_the_whole_body():
    body = orjson.dumps(one_input("INT8", [1], data=[5]))
    (tensor,) = decode_infer_request(body, len(body), "m", "1").inputs
    assert bytes(tensor.data) == b"\x05"


def test_body_may_be_a_bytearray_or_memoryview():
    blob = np.arange(2, dtype=np.int16).tobytes()
    body, header_length = request_body(
        one_input("INT16", [2], parameters={"binary_data_size": 4}), blob
    )
    for wrapped in (bytearray(body), memoryview(body)):
        (tensor,) = decode_infer_request(wrapped, header_length, "m", "1").inputs
        assert bytes(tensor.data) == blob


def _mixed_request(a: np.ndarray, j: list[int]) -> tuple[bytes, int]:
    """A binary FP32 input, a JSON INT64 input, a shared-memory input, two outputs."""
    doc = {
        "id": "r1",
        "parameters": {"binary_data_output": True, "priority": 2},
        "inputs": [
            {"name": "A", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}},
            {"name": "J", "datatype": "INT64", "shape": [2], "data": j},
            {
                "name": "S",
                "datatype": "FP32",
                "shape": [2],
                "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 8},
            },
        ],
        "outputs": [{"name": "O", "parameters": {"binary_data": True}}, {"name": "P"}],
    }
    return request_body(doc, a.tobytes())  # type: ignore[return-value]


def test_header_memo_rebuilds_a_repeated_header_with_the_new_data():
    memo = RequestMemo()
    first_a, second_a = np.arange(4, dtype=np.float32), np.full(4, 9.5, np.float32)
    body, header_length = _mixed_request(first_a, [7, 8])
    first = decode_infer_request(body, header_length, "m", "1", memo)
    assert request_fields(first) == request_fields(
        decode_infer_request(body, header_length, "m", "1")
    )
    body2, header_length2 = _mixed_request(second_a, [7, 8])
    assert header_length2 == header_length
    second = decode_infer_request(body2, header_length2, "other", "2", memo)
    assert request_fields(second) == request_fields(
        decode_infer_request(body2, header_length2, "other", "2")
    )
    assert bytes(second.inputs[0].data) == second_a.tobytes()
    assert bytes(first.inputs[0].data) == first_a.tobytes()  # each keeps its own data
    assert second.checked is first.checked is memo.checked
    # A new header (the JSON data changed) is decoded, then remembered in its place.
    body3, header_length3 = _mixed_request(second_a, [1, 2])
    third = decode_infer_request(body3, header_length3, "m", "1", memo)
    assert bytes(third.inputs[1].data) == np.array([1, 2], np.int64).tobytes()
    assert third.checked is memo.checked is not first.checked


def test_header_memo_never_skips_a_check_that_depends_on_the_body():
    memo = RequestMemo()
    body, header_length = _mixed_request(np.arange(4, dtype=np.float32), [7, 8])
    decode_infer_request(body, header_length, "m", "1", memo)
    # The same header with a binary part of another length is decoded, and refused.
    with pytest.raises(ServerError, match="additional input data"):
        decode_infer_request(body + b"\0", header_length, "m", "1", memo)
    # BYTES elements are checked against the bytes of each request: never remembered.
    good = dtypes.serialize_bytes(np.array([b"ab", b"cd"], np.object_))
    doc = one_input("BYTES", [2], parameters={"binary_data_size": len(good)})
    body, header_length = request_body(doc, good)
    decode_infer_request(body, header_length, "m", "1", memo)
    assert memo.total == -1
    bad = struct.pack("<I", 9) + b"abcdefgh"  # as long, but its first element overruns it
    body, header_length = request_body(doc, bad)
    with pytest.raises(ServerError, match="malformed BYTES data"):
        decode_infer_request(body, header_length, "m", "1", memo)
    # A body that is not bytes (a shared-memory block's view) is never remembered.
    body, header_length = _mixed_request(np.arange(4, dtype=np.float32), [7, 8])
    fresh = RequestMemo()
    decode_infer_request(memoryview(body), header_length, "m", "1", fresh)
    assert fresh.total == -1


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), ("0", 0), ("123", 123), (" 42 ", 42)]
)
def test_parse_header_length(value, expected):
    assert parse_header_length(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "-1", "1.5", "+3", "0x10"])
def test_parse_header_length_rejects(value):
    with pytest.raises(ServerError) as err:
        parse_header_length(value)
    assert err.value.code is Code.INVALID_ARG
    assert "Inference-Header-Content-Length" in err.value.message


# -- request errors ---------------------------------------------------------------------

F16 = list(range(16))
BIN16 = {"binary_data_size": 16}


def _input(**fields) -> dict:
    return {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [4], **fields}]}


# (id, JSON document or raw body, binary blobs, substrings the message must contain)
REQUEST_ERRORS = [
    ("bad-json", b'{"inputs": [', None, ["failed to parse the request JSON buffer", " at "]),
    ("empty-body", b"", None, ["failed to parse the request JSON buffer"]),
    ("not-an-object", [1, 2], (), ["must be an object", "'inputs'"]),
    ("no-inputs", {"outputs": []}, (), ["'inputs'"]),
    ("inputs-not-array", {"inputs": {"name": "x"}}, (), ["'inputs'", "array"]),
    ("input-not-object", {"inputs": [3]}, (), ["input 0"]),
    ("no-name", {"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, (), ["'name'", "input 0"]),
    ("name-not-string", {"inputs": [{"name": 5, "datatype": "FP32", "shape": [1], "data": [1]}]}, (), ["'name'", "input 0"]),
    ("no-datatype", {"inputs": [{"name": "INPUT0", "shape": [1], "data": [1]}]}, (), ["'datatype'", "'INPUT0'"]),
    ("no-shape", {"inputs": [{"name": "INPUT0", "datatype": "FP32", "data": [1]}]}, (), ["'shape'", "'INPUT0'"]),
    ("unknown-datatype", one_input("FLOAT", [1], data=[1]), (), ["unknown datatype 'FLOAT'", "'INPUT0'", "FP32"]),
    ("too-few", one_input("INT32", [1, 16], data=F16[:15]), (), ["unexpected number of elements for input 'INPUT0'", "expected 16", "got 15"]),
    ("too-many", one_input("INT32", [1, 16], data=F16 + [16]), (), ["'INPUT0'", "expected 16", "got 17"]),
    ("nested-count", one_input("FP32", [2, 2], data=[[1, 2], [3]]), (), ["'INPUT0'", "expected 4", "got 3"]),
    ("bytes-count", one_input("BYTES", [3], data=["a", "b"]), (), ["'INPUT0'", "expected 3", "got 2"]),
    ("data-not-array", one_input("FP32", [1], data=1.0), (), ["'data'", "'INPUT0'", "array"]),
    ("string-in-fp32", one_input("FP32", [2], data=[1.0, "2"]), (), ["'INPUT0'", "numbers"]),
    ("null-in-fp32", one_input("FP32", [2], data=[1.0, None]), (), ["'INPUT0'", "numbers"]),
    ("bool-in-fp32", one_input("FP32", [2], data=[True, False]), (), ["'INPUT0'", "numbers"]),
    ("float-in-int32", one_input("INT32", [2], data=[1, 2.5]), (), ["'INPUT0'", "integers"]),
    ("int-in-bool", one_input("BOOL", [2], data=[0, 1]), (), ["'INPUT0'", "true or false"]),
    ("uint8-overflow", one_input("UINT8", [2], data=[1, 256]), (), ["'INPUT0'", "from 0 to 255"]),
    ("int8-underflow", one_input("INT8", [1], data=[-129]), (), ["'INPUT0'", "from -128 to 127"]),
    ("negative-uint32", one_input("UINT32", [1], data=[-1]), (), ["'INPUT0'", "integers"]),
    ("int64-overflow", one_input("INT64", [1], data=[2**63]), (), ["'INPUT0'", "integers"]),
    ("number-in-bytes", one_input("BYTES", [2], data=["a", 1]), (), ["'INPUT0'", "strings"]),
    ("data-and-region", _input(data=[1, 2, 3, 4], parameters={"shared_memory_region": "r"}), (), ["'INPUT0'", "exactly one", "'data' and 'shared_memory_region'"]),
    ("data-and-binary", _input(data=[1, 2, 3, 4], parameters=BIN16), (b"\0" * 16,), ["'INPUT0'", "'data' and 'binary_data_size'"]),
    ("no-data", _input(), (), ["'INPUT0'", "sets none"]),
    ("binary-without-header", _input(parameters=BIN16), (), ["'INPUT0'", "Inference-Header-Content-Length"]),
    ("binary-size-mismatch", _input(parameters={"binary_data_size": 12}), (b"\0" * 12,), ["unexpected total byte size 12 for input 'INPUT0', expecting 16"]),
    ("binary-past-end", _input(parameters=BIN16), (b"\0" * 10,), ["'INPUT0'", "16", "only 10 bytes"]),
    ("binary-leftover", _input(parameters=BIN16), (b"\0" * 20,), ["unexpected additional input data for model 'm'", "4 bytes"]),
    ("binary-size-negative", _input(parameters={"binary_data_size": -4}), (b"",), ["'binary_data_size'", "'INPUT0'"]),
    ("binary-size-string", _input(parameters={"binary_data_size": "16"}), (b"\0" * 16,), ["'binary_data_size'", "'INPUT0'"]),
    ("bytes-truncated-length", one_input("BYTES", [1], parameters={"binary_data_size": 2}), (b"\1\0",), ["malformed BYTES data for input 'INPUT0'"]),
    ("bytes-element-past-end", one_input("BYTES", [1], parameters={"binary_data_size": 6}), (struct.pack("<I", 5) + b"ab",), ["malformed BYTES data for input 'INPUT0'", "element 0"]),
    ("bytes-element-count", one_input("BYTES", [2], parameters={"binary_data_size": 5}), (struct.pack("<I", 1) + b"a",), ["string elements 1 for input 'INPUT0'", "expecting 2"]),
    ("region-not-string", _input(parameters={"shared_memory_region": 3}), (), ["'shared_memory_region'", "'INPUT0'"]),
    ("offset-negative", _input(parameters={"shared_memory_region": "r", "shared_memory_offset": -1}), (), ["'shared_memory_offset'", "'INPUT0'"]),
    ("input-param-object", _input(data=[1, 2, 3, 4], parameters={"extra": {"a": 1}}), (), ["'extra'", "'INPUT0'"]),
    ("input-params-not-object", _input(data=[1, 2, 3, 4], parameters=[1]), (), ["'parameters'", "'INPUT0'"]),
    ("duplicate-input", {"inputs": [_input(data=[1, 2, 3, 4])["inputs"][0]] * 2}, (), ["'INPUT0'", "more than once"]),
    ("id-not-string", {"id": 7, "inputs": []}, (), ["'id'", "string"]),
    ("params-not-object", {"parameters": [], "inputs": []}, (), ["'parameters'"]),
    ("binary-output-not-bool", {"parameters": {"binary_data_output": 1}, "inputs": []}, (), ["'binary_data_output'"]),
    ("reserved-param", {"parameters": {"triton_x": 1}, "inputs": []}, (), ["'triton_x'", "reserved"]),
    ("param-object", {"parameters": {"extra": [1]}, "inputs": []}, (), ["'extra'", "invalid type"]),
    ("priority-negative", {"parameters": {"priority": -1}, "inputs": []}, (), ["'priority'"]),
    ("sequence-start-int", {"parameters": {"sequence_start": 1}, "inputs": []}, (), ["'sequence_start'"]),
    ("sequence-id-float", {"parameters": {"sequence_id": 1.5}, "inputs": []}, (), ["'sequence_id'"]),
    ("outputs-not-array", {"inputs": [], "outputs": {"name": "x"}}, (), ["'outputs'"]),
    ("output-no-name", {"inputs": [], "outputs": [{"parameters": {}}]}, (), ["'name'", "output 0"]),
    ("output-binary-not-bool", {"inputs": [], "outputs": [{"name": "OUT0", "parameters": {"binary_data": "yes"}}]}, (), ["'binary_data'", "'OUT0'"]),
    ("output-classification-negative", {"inputs": [], "outputs": [{"name": "OUT0", "parameters": {"classification": -1}}]}, (), ["'classification'", "'OUT0'"]),
    ("output-shm-and-classification", {"inputs": [], "outputs": [{"name": "OUT0", "parameters": {"shared_memory_region": "r", "classification": 2}}]}, (), ["'OUT0'", "'shared_memory_region' and 'classification'"]),
    ("output-shm-and-binary", {"inputs": [], "outputs": [{"name": "OUT0", "parameters": {"shared_memory_region": "r", "binary_data": True}}]}, (), ["'OUT0'", "'shared_memory_region' and 'binary_data'"]),
]  # fmt: skip


@pytest.mark.parametrize("dim", [-1, 1.5, True, "4"])
def test_a_dimension_that_is_not_an_unsigned_integer_gets_tritons_500(dim):
    """Triton answers 500 (INTERNAL, its JSON reader's error) with these words, which
    its qa/L0_http test checks; Despina adds which input and what to fix."""
    body, header_length = request_body(one_input("FP32", [dim, 4], data=F16))
    with pytest.raises(ServerError) as err:
        decode_infer_request(body, header_length, "m", "1")
    assert err.value.code is Code.INTERNAL
    assert err.value.message.startswith(
        "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as "
        "unsigned-integer (input 'INPUT0' has shape ["
    )
    assert "dimensions must be non-negative integers" in err.value.message


@pytest.mark.parametrize(
    ("doc", "blobs", "needles"),
    [case[1:] for case in REQUEST_ERRORS],
    ids=[case[0] for case in REQUEST_ERRORS],
)
def test_request_errors(doc, blobs, needles):
    if isinstance(doc, bytes):
        body, header_length = doc, None
    else:
        body, header_length = request_body(doc, *blobs)
    with pytest.raises(ServerError) as err:
        decode_infer_request(body, header_length, "m", "1")
    assert err.value.code is Code.INVALID_ARG
    for needle in needles:
        assert needle in err.value.message


@pytest.mark.parametrize("header_length", [-1, 1000])
def test_header_length_out_of_range(header_length):
    body = orjson.dumps({"inputs": []})
    with pytest.raises(ServerError) as err:
        decode_infer_request(body, header_length, "m", "1")
    assert err.value.code is Code.INVALID_ARG
    assert f"got: {header_length}" in err.value.message


def test_header_length_shorter_than_the_json():
    body = orjson.dumps({"inputs": []})
    with pytest.raises(ServerError) as err:
        decode_infer_request(body, len(body) - 1, "m", "1")
    assert err.value.code is Code.INVALID_ARG
    assert "failed to parse the request JSON buffer" in err.value.message


def test_raw_binary_request_needs_the_model_config():
    with pytest.raises(ServerError) as err:
        decode_infer_request(b"\0\0\0\0", 0, "m", "1")
    assert err.value.code is Code.INTERNAL


def _config(*inputs: tuple[str, str, list[int]], batch: int = 8) -> bytes:
    return orjson.dumps(
        {
            "max_batch_size": batch,
            "input": [{"name": n, "data_type": t, "dims": d} for n, t, d in inputs],
        }
    )


def test_raw_binary_request_deduces_the_variable_dim():
    body = np.arange(6, dtype=np.float32).tobytes()
    req = decode_raw_request(body, _config(("INPUT0", "TYPE_FP32", [-1])), "m", "")
    (tensor,) = req.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("INPUT0", "FP32", [1, 6])
    assert bytes(tensor.data) == body and req.binary_output and req.outputs == []


def test_raw_binary_bytes_input_gets_its_length_prefix():
    req = decode_raw_request(b"427", _config(("T", "TYPE_STRING", [1]), batch=0), "m", "")
    assert req.inputs[0].shape == [1] and bytes(req.inputs[0].data) == struct.pack("<I", 3) + b"427"


@pytest.mark.parametrize(
    "inputs, message",
    [
        (
            [("A", "TYPE_INT32", [16]), ("B", "TYPE_INT32", [16])],
            "Raw request must only have 1 input (found 1) to be deduced but got 2 inputs "
            "in 'm' model configuration",
        ),
        (
            [("A", "TYPE_FP16", [-1, -1])],
            "The shape of the raw input 'A' can not be deduced because there are more "
            "than one variable-sized dimension",
        ),
        (
            [("A", "TYPE_STRING", [-1])],
            "For BYTE datatype raw input 'A', the model must have input shape [1]",
        ),
        ([("A", "TYPE_INT32", [16])], "unexpected total byte size 4 for raw input 'A'"),
    ],
)
def test_raw_binary_request_refusals(inputs, message):
    with pytest.raises(ServerError) as err:
        decode_raw_request(b"\0\0\0\0", _config(*inputs), "m", "")
    assert err.value.code is Code.INVALID_ARG
    assert message in err.value.message


# -- responses ----------------------------------------------------------------------------


def _fp32(name: str, values: list[float]) -> OutputTensor:
    return OutputTensor(name, "FP32", [len(values)], np.array(values, np.float32).tobytes())


def test_response_envelope():
    result = result_of(_fp32("OUT", [1.0]), parameters={"sequence_id": 3})
    request = InferenceRequest(model="m", version="", id="abc", inputs=[], outputs=[])
    body, header_length = encode_infer_response(result, request)
    assert header_length is None
    assert orjson.loads(body) == {
        "model_name": "m",
        "model_version": "1",
        "id": "abc",
        "parameters": {"sequence_id": 3},
        "outputs": [{"name": "OUT", "datatype": "FP32", "shape": [1], "data": [1.0]}],
    }


def test_response_omits_empty_id_and_parameters():
    body, _ = encode_infer_response(result_of(_fp32("OUT", [1.0])), request_of())
    assert set(orjson.loads(body)) == {"model_name", "model_version", "outputs"}


@pytest.mark.parametrize(
    ("outputs", "binary_output", "expected_binary"),
    [
        ([], False, {"A": False, "B": False}),
        ([], True, {"A": True, "B": True}),  # binary_data_output covers unlisted outputs
        ([OutputRequest("A"), OutputRequest("B", binary=True)], False, {"A": False, "B": True}),
        # A listed output follows its own binary_data, as Triton does.
        ([OutputRequest("A"), OutputRequest("B", binary=True)], True, {"A": False, "B": True}),
        ([OutputRequest("A", binary=True), OutputRequest("B", binary=True)], False, {"A": True, "B": True}),
    ],
    ids=["json-default", "binary-default", "mixed", "listed-ignores-default", "all-binary"],
)  # fmt: skip
def test_which_outputs_are_binary(outputs, binary_output, expected_binary):
    a, b = _fp32("A", [1.0, 2.0]), _fp32("B", [3.0])
    request = request_of(outputs, binary_output=binary_output)
    body, header_length = encode_infer_response(result_of(a, b), request)
    doc, tail = split_response(body, header_length)
    got = {e["name"]: "parameters" in e for e in doc["outputs"]}
    assert got == expected_binary
    assert (header_length is None) == (not any(expected_binary.values()))
    expected_tail = b"".join(o.data for o in (a, b) if expected_binary[o.name])
    assert tail == expected_tail
    for entry in doc["outputs"]:
        assert ("data" in entry) != ("parameters" in entry)


def test_binary_outputs_keep_output_order_around_json_ones():
    outs = [
        OutputTensor("X", "INT32", [2], np.array([1, 2], np.int32).tobytes()),
        _fp32("Y", [9.0]),
        OutputTensor("Z", "BYTES", [1], dtypes.serialize_bytes(np.array([b"zz"], np.object_))),
    ]
    request = request_of(
        [OutputRequest("Z", binary=True), OutputRequest("Y"), OutputRequest("X", binary=True)]
    )
    body, header_length = encode_infer_response(result_of(*outs), request)
    doc, tail = split_response(body, header_length)
    assert [e["name"] for e in doc["outputs"]] == ["X", "Y", "Z"]
    assert doc["outputs"][1]["data"] == [9.0]
    assert tail == outs[0].data + outs[2].data


def test_empty_binary_output_has_size_zero_and_no_bytes():
    out = OutputTensor("OUT", "FP32", [0], b"")
    body, header_length = encode_infer_response(result_of(out), request_of(binary_output=True))
    doc, tail = split_response(body, header_length)
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 0}
    assert tail == b""


def test_shared_memory_output_carries_no_data():
    out = _fp32("OUT", [1.0, 2.0])
    request = request_of(
        [
            OutputRequest(
                "OUT", parameters={"shared_memory_region": "r", "shared_memory_byte_size": 8}
            )
        ]
    )
    body, header_length = encode_infer_response(result_of(out), request)
    assert header_length is None
    assert orjson.loads(body)["outputs"] == [{"name": "OUT", "datatype": "FP32", "shape": [2]}]


def test_non_utf8_bytes_output_is_sent_as_binary():
    blob = dtypes.serialize_bytes(np.array([b"ok", b"\xff\xfe"], np.object_))
    out = OutputTensor("OUT", "BYTES", [2], blob)
    body, header_length = encode_infer_response(result_of(out), request_of())
    doc, tail = split_response(body, header_length)
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": len(blob)}
    assert "data" not in doc["outputs"][0]
    assert tail == blob


def test_memoryview_outputs_of_any_format():
    array = np.array([1.5, -2.5], np.float64)
    out = OutputTensor("OUT", "FP64", [2], memoryview(array))
    body, _ = encode_infer_response(result_of(out), request_of())
    assert orjson.loads(body)["outputs"][0]["data"] == [1.5, -2.5]
    body, header_length = encode_infer_response(result_of(out), request_of(binary_output=True))
    doc, tail = split_response(body, header_length)
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert tail == array.tobytes()


@pytest.mark.parametrize(
    ("out", "binary"),
    [
        (OutputTensor("OUT", "FP32", [3], b"\0" * 8), False),
        (OutputTensor("OUT", "FP32", [3], b"\0" * 8), True),
        (OutputTensor("OUT", "BYTES", [2], struct.pack("<I", 1) + b"a"), False),
        (OutputTensor("OUT", "BYTES", [1], struct.pack("<I", 9) + b"a"), False),
        (OutputTensor("OUT", "FLOAT", [1], b"\0" * 4), False),
    ],
    ids=["fp32-json", "fp32-binary", "bytes-count", "bytes-truncated", "unknown-type"],
)
def test_inconsistent_outputs_are_internal_errors(out, binary):
    with pytest.raises(ServerError) as err:
        encode_infer_response(result_of(out), request_of(binary_output=binary))
    assert err.value.code is Code.INTERNAL
    assert "'OUT'" in err.value.message


# -- conformance with tritonclient's own encoder and decoder -------------------------------

CLIENT_ARRAYS = [
    ("FP32", np.arange(6, dtype=np.float32).reshape(2, 3) / 4),
    ("INT64", np.array([[-(2**40), 7]], np.int64)),
    ("UINT8", np.array([0, 200, 255], np.uint8)),
    ("BOOL", np.array([[True], [False]])),
    ("FP16", np.array([0.5, -1.5], np.float16)),
    ("BYTES", np.array([["abc", "déf"]], np.object_)),
]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_round_trip_through_tritonclient(binary):
    httpclient = pytest.importorskip("tritonclient.http")
    inputs, outputs = [], []
    for index, (datatype, array) in enumerate(CLIENT_ARRAYS):
        tensor = httpclient.InferInput(f"IN{index}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
        outputs.append(httpclient.InferRequestedOutput(f"IN{index}", binary_data=binary))
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs, request_id="r1", sequence_id=5, priority=1
    )
    request = decode_infer_request(body, json_size, "m", "")
    assert (request.id, request.parameters) == ("r1", {"sequence_id": 5, "sequence_start": False, "sequence_end": False, "priority": 1})  # fmt: skip
    assert [(o.name, o.binary) for o in request.outputs] == [(f"IN{i}", binary) for i in range(len(CLIENT_ARRAYS))]  # fmt: skip

    # Echo every input back as an output of the same name.
    echoed = [OutputTensor(t.name, t.datatype, t.shape, bytes(t.data)) for t in request.inputs]
    response, header_length = encode_infer_response(result_of(*echoed), request)
    parsed = httpclient.InferResult.from_response_body(response, header_length=header_length)
    assert parsed.get_response()["id"] == "r1"
    for index, (datatype, array) in enumerate(CLIENT_ARRAYS):
        got = parsed.as_numpy(f"IN{index}")
        if datatype == "BYTES":
            # tritonclient yields str from JSON and bytes from binary data, as with Triton.
            as_bytes = [e.encode() if isinstance(e, str) else e for e in got.reshape(-1)]
            assert as_bytes == [e.encode() for e in array.reshape(-1)]
        else:
            np.testing.assert_array_equal(got, array)
            assert got.dtype == array.dtype


def test_encode_error():
    assert orjson.loads(encode_error('bad "input"')) == {"error": 'bad "input"'}


def test_reply_memo_reuses_the_json_of_a_repeated_response():
    memo = RequestMemo()
    body, header_length = _mixed_request(np.arange(4, dtype=np.float32), [7, 8])
    request = decode_infer_request(body, header_length, "m", "1", memo)
    request.outputs = [OutputRequest("O", True), OutputRequest("P", True)]

    def result(o: np.ndarray, p: np.ndarray) -> InferenceResult:
        return InferenceResult(
            "m",
            "1",
            "r1",
            [
                OutputTensor("O", "FP32", list(o.shape), o.tobytes()),
                OutputTensor("P", "INT64", list(p.shape), p.tobytes()),
            ],
        )

    for o, p in [
        (np.arange(3, dtype=np.float32), np.arange(2)),
        (np.full(3, 7, np.float32), np.array([9, 9])),  # same shapes: the JSON is reused
        (np.arange(5, dtype=np.float32), np.arange(2)),  # another shape: encoded anew
    ]:
        parts, json_length = encode_infer_response_parts(result(o, p), request, memo)
        fresh, fresh_length = encode_infer_response_parts(result(o, p), request)
        assert (b"".join(parts), json_length) == (b"".join(fresh), fresh_length)
        assert b"".join(parts[1:]) == o.tobytes() + p.tobytes()
    assert memo.reply is not None
    # An output sent as JSON values carries them in the JSON: never reused.
    request.outputs = [OutputRequest("O", False)]
    memo.reply = None
    o = np.arange(3, dtype=np.float32)
    res = InferenceResult("m", "1", "r1", [OutputTensor("O", "FP32", [3], o.tobytes())])
    parts, json_length = encode_infer_response_parts(res, request, memo)
    assert json_length is None and orjson.loads(parts[0])["outputs"][0]["data"] == [0, 1, 2]
    assert memo.reply is None


# -- issue #12: bounds on what a request may make the frontend do ----------------------


def _refusal(doc: dict, *blobs: bytes) -> str:
    with pytest.raises(ServerError) as err:
        decode(doc, *blobs)
    assert err.value.code is Code.INVALID_ARG
    return err.value.message


def test_shape_numpy_cannot_build_is_refused_naming_the_input():
    doc = one_input("FP32", [0, 2**62], parameters={"binary_data_size": 0})
    assert _refusal(doc, b"\x00").startswith(
        "byte size overflow for input 'INPUT0': shape [0,4611686018427387904] spans more than"
    )
    assert "spans more than" in _refusal(one_input("FP32", [2**30, 2**30], data=[]))
    assert _refusal(one_input("FP32", [16, 2**60 + 2], data=[1.0])) == (
        "input 'INPUT0' shape [16,1152921504606846978] causes total element count to exceed "
        "maximum size of 9223372036854775807"
    )
    assert "it has 65 dimensions" in _refusal(one_input("FP32", [1] * 65, data=[1.0]))
    fine = decode(one_input("FP32", [0, 2**59], data=[]))
    assert fine.inputs[0].shape == [0, 2**59] and fine.inputs[0].data == b""


def test_millions_of_zero_length_bytes_elements_decode_in_milliseconds():
    import time

    count = 8 << 20  # 32 MiB of zero lengths: the old walk held the loop ~1.7 s
    blob = bytes(4 * count)
    doc = one_input("BYTES", [count], parameters={"binary_data_size": len(blob)})
    decode(doc, blob)  # warm numpy up
    start = time.perf_counter()
    request = decode(doc, blob)
    assert time.perf_counter() - start < 0.5  # ~3 ms here; generous for a loaded VM
    assert request.inputs[0].data.nbytes == len(blob)
    short = one_input("BYTES", [count + 1], parameters={"binary_data_size": len(blob)})
    assert f"hold at most {count}, expecting {count + 1}" in _refusal(short, blob)
