"""The gRPC converters: protobuf <-> the protocol-neutral records (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import serialize_byte_tensor

from despina.common.errors import Code, ServerError
from despina.services.frontend.grpc import converters as c
from despina.services.frontend.inference import (
    InferenceResult,
    OutputRequest,
    OutputTensor,
    RequestMemo,
)

from conftest import request_fields


def request_with(*tensors, raw: list[bytes] | None = None, **kw) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", **kw)
    for name, datatype, shape in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend(raw or [])
    return request


def test_raw_inputs_outputs_and_parameters():
    a = np.arange(4, dtype=np.float32)
    request = request_with(("A", "FP32", [1, 4]), ("B", "BYTES", [2]), raw=[a.tobytes()], id="7")
    request.raw_input_contents.append(serialize_byte_tensor(np.array([b"x", b""], object)).item())
    request.model_version = "2"
    request.outputs.add(name="OUT").parameters["classification"].int64_param = 2
    request.parameters["s"].string_param = "v"
    request.parameters["u"].uint64_param = 2**64 - 1
    request.parameters["d"].double_param = 0.5
    request.parameters["b"].bool_param = True
    request.parameters[c.ENABLE_FINAL_RESPONSE].bool_param = True
    decoded = c.decode_infer_request(request)
    assert (decoded.model, decoded.version, decoded.id) == ("m", "2", "7")
    assert [(t.name, t.datatype, t.shape) for t in decoded.inputs] == [
        ("A", "FP32", [1, 4]),
        ("B", "BYTES", [2]),
    ]
    assert decoded.inputs[0].data == a.tobytes()
    assert decoded.parameters == {"s": "v", "u": 2**64 - 1, "d": 0.5, "b": True}
    assert decoded.outputs[0].name == "OUT"
    assert decoded.outputs[0].parameters == {"classification": 2}
    assert c.wants_final_flag(request)


def test_shared_memory_input_has_no_data():
    request = request_with(("A", "FP32", [4]))
    params = request.inputs[0].parameters
    params["shared_memory_region"].string_param = "r"
    params["shared_memory_byte_size"].int64_param = 16
    decoded = c.decode_infer_request(request)
    assert decoded.inputs[0].data is None
    assert decoded.inputs[0].parameters == {
        "shared_memory_region": "r",
        "shared_memory_byte_size": 16,
    }


@pytest.mark.parametrize(
    "datatype,field,values,dtype",
    [
        ("BOOL", "bool_contents", [True, False], np.bool_),
        ("INT8", "int_contents", [-128, 127], np.int8),
        ("INT16", "int_contents", [-32768, 32767], np.int16),
        ("INT32", "int_contents", [-(2**31), 2**31 - 1], np.int32),
        ("INT64", "int64_contents", [-(2**63), 2**63 - 1], np.int64),
        ("UINT8", "uint_contents", [0, 255], np.uint8),
        ("UINT16", "uint_contents", [0, 65535], np.uint16),
        ("UINT32", "uint_contents", [0, 2**32 - 1], np.uint32),
        ("UINT64", "uint64_contents", [0, 2**64 - 1], np.uint64),
        ("FP32", "fp32_contents", [1.5, -2.0], np.float32),
        ("FP64", "fp64_contents", [1e300, -2.0], np.float64),
    ],
)
def test_typed_contents(datatype, field, values, dtype):
    request = request_with(("A", datatype, [2]))
    getattr(request.inputs[0].contents, field).extend(values)
    data = c.decode_infer_request(request).inputs[0].data
    np.testing.assert_array_equal(np.frombuffer(data, dtype), np.array(values, dtype))


def test_typed_bytes_and_mixed_with_raw():
    request = request_with(("A", "BYTES", [2]), ("B", "FP16", [1]))
    request.inputs[0].contents.bytes_contents.extend([b"ab", b""])
    request.raw_input_contents.append(np.float16(1).tobytes())
    decoded = c.decode_infer_request(request)
    assert decoded.inputs[0].data == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    assert decoded.inputs[1].data == np.float16(1).tobytes()


def invalid(request: pb.ModelInferRequest) -> str:
    with pytest.raises(ServerError) as info:
        c.decode_infer_request(request)
    assert info.value.code is Code.INVALID_ARG
    return info.value.message


def test_malformed_requests_name_what_to_fix():
    assert "unexpected total byte size 3 for input 'A', expecting 4" in invalid(
        request_with(("A", "FP32", [1]), raw=[b"abc"])
    )
    assert "unknown datatype 'F32'" in invalid(request_with(("A", "F32", [1]), raw=[b"abcd"]))
    assert "non-negative" in invalid(request_with(("A", "FP32", [-1, -1]), raw=[b"abcd"]))
    assert "input 'A' has no data" in invalid(request_with(("A", "FP32", [1])))
    assert "holds 2 entries but the request's inputs use 1" in invalid(
        request_with(("A", "FP32", [1]), raw=[b"abcd", b"abcd"])
    )
    assert "malformed BYTES data for input 'A'" in invalid(
        request_with(("A", "BYTES", [1]), raw=[b"\x09\x00\x00\x00ab"])
    )
    assert "unexpected number of string elements 1" in invalid(
        request_with(("A", "BYTES", [2]), raw=[b"\x00\x00\x00\x00"])
    )
    fp16 = request_with(("A", "FP16", [1]))
    fp16.inputs[0].contents.fp32_contents.append(1.0)
    assert "has no typed 'contents' field" in invalid(fp16)
    short = request_with(("A", "INT32", [3]))
    short.inputs[0].contents.int_contents.extend([1, 2])
    assert "expected 3 (shape [3]) in 'contents.int_contents', got 2" in invalid(short)
    wide = request_with(("A", "UINT8", [1]))
    wide.inputs[0].contents.uint_contents.append(256)
    assert "UINT8 elements must be integers from 0 to 255" in invalid(wide)
    reserved = request_with(("A", "FP32", [1]), raw=[b"abcd"])
    reserved.parameters["triton_x"].bool_param = True
    assert "reserved for Triton usage" in invalid(reserved)
    unset = request_with(("A", "FP32", [1]), raw=[b"abcd"])
    unset.parameters["k"].CopyFrom(pb.InferParameter())
    assert "parameter 'k' has no value" in invalid(unset)
    region = request_with(("A", "FP32", [1]))
    region.inputs[0].parameters["shared_memory_region"].int64_param = 3
    assert "'shared_memory_region' of input 'A'" in invalid(region)


def test_response_raw_outputs_parameters_and_shm_placeholders():
    request = c.decode_infer_request(request_with(("A", "FP32", [1]), raw=[b"abcd"], id="x"))
    data = np.arange(4, dtype=np.float32).tobytes()
    result = InferenceResult(
        "m",
        "1",
        "x",
        [
            OutputTensor("O0", "FP32", [1, 4], memoryview(data)),
            OutputTensor("O1", "FP32", [1, 4], None),
            OutputTensor("O2", "BYTES", [1], b"\x01\x00\x00\x00z"),
        ],
        {"flag": True, "n": 3, "big": 2**64 - 1, "f": 0.25, "s": "t"},
    )
    response = c.encode_infer_response(result, request)
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "x")
    assert [o.name for o in response.outputs] == ["O0", "O1", "O2"]
    assert list(response.outputs[0].shape) == [1, 4]
    assert list(response.raw_output_contents) == [data, b"", b"\x01\x00\x00\x00z"]
    params = response.parameters
    assert params["flag"].bool_param and params["n"].int64_param == 3
    assert params["big"].uint64_param == 2**64 - 1
    assert params["f"].double_param == 0.25 and params["s"].string_param == "t"
    streamed = c.stream_response(result, request, final_flag=True)
    assert streamed.infer_response.raw_output_contents[0] == data
    assert streamed.infer_response.parameters[c.FINAL_RESPONSE].bool_param
    bad = InferenceResult("m", "1", "", [OutputTensor("O0", "FP32", [2], b"abc")])
    with pytest.raises(ServerError) as info:
        c.encode_infer_response(bad, request)
    assert info.value.code is Code.INTERNAL


def test_large_messages_keep_tensor_bytes_out_of_protobuf():
    """Past LARGE_MESSAGE, raw inputs are views of the message bytes and raw outputs are
    written after the rest of the response: the same messages protobuf reads and writes."""
    big = np.arange(c.LARGE_MESSAGE, dtype=np.float32)
    small = np.arange(3, dtype=np.int32)
    request = request_with(
        ("A", "FP32", [big.size]), ("S", "INT32", [3]), raw=[big.tobytes(), small.tobytes()]
    )
    request.parameters["p"].int64_param = 5
    request.outputs.add(name="O")
    message = request.SerializeToString()
    parsed, raw = c.parse_infer_request(message)
    assert raw is not None and all(isinstance(v, memoryview) for v in raw)
    assert not parsed.raw_input_contents and parsed.parameters["p"].int64_param == 5
    decoded = c.decode_infer_request(parsed, raw)
    assert decoded == c.decode_infer_request(request)
    assert c.decode_message(message) == decoded
    # Small messages take protobuf's path; malformed ones are INVALID_ARG either way.
    assert (
        c.parse_infer_request(request_with(("A", "FP32", [1]), raw=[b"abcd"]).SerializeToString())[
            1
        ]
        is None
    )
    for garbage in (b"\xff\xff\xff\xff", b"\x3a\xff\xff\xff\x7f" + bytes(c.LARGE_MESSAGE)):
        with pytest.raises(ServerError) as info:
            c.parse_infer_request(garbage)
        assert info.value.code is Code.INVALID_ARG

    outputs = [
        OutputTensor("O0", "FP32", [big.size], memoryview(big.tobytes())),
        OutputTensor("O1", "FP32", [1, 4], None),
        OutputTensor("O2", "INT32", [3], small.tobytes()),
    ]
    result = InferenceResult("m", "1", "", outputs, {"n": 3})
    expected = c.encode_infer_response(result, decoded)
    wire = c.serialize_infer_response(result, decoded)
    assert pb.ModelInferResponse.FromString(wire) == expected
    assert list(expected.raw_output_contents) == [big.tobytes(), b"", small.tobytes()]
    streamed = pb.ModelStreamInferResponse.FromString(
        c.serialize_stream_response(result, decoded, True)
    )
    assert streamed == c.stream_response(result, decoded, True)
    assert streamed.infer_response.parameters[c.FINAL_RESPONSE].bool_param
    tiny = InferenceResult("m", "1", "", [OutputTensor("O2", "INT32", [3], small.tobytes())])
    assert c.serialize_infer_response(tiny, decoded) == (
        c.encode_infer_response(tiny, decoded).SerializeToString()
    )


def test_stream_error_names_the_request():
    request = pb.ModelInferRequest(model_name="m", model_version="3", id="r9")
    response = c.stream_error("boom", request)
    assert response.error_message == "boom"
    assert (response.infer_response.id, response.infer_response.model_name) == ("r9", "m")


def _small_request(a: np.ndarray, b: np.ndarray) -> pb.ModelInferRequest:
    request = request_with(
        ("A", "FP32", [1, 4]), ("T", "INT32", [2]), ("B", "INT8", [3]), raw=[a.tobytes()], id="x"
    )
    request.inputs[1].contents.int_contents.extend([5, 6])
    request.raw_input_contents.append(b.tobytes())
    request.outputs.add(name="O")
    request.parameters["priority"].int64_param = 1
    return request


def test_memo_rebuilds_a_repeated_message_with_the_new_data():
    memo = RequestMemo()
    a, b = np.arange(4, dtype=np.float32), np.arange(3, dtype=np.int8)
    first = c.decode_message(_small_request(a, b).SerializeToString(), memo)
    assert memo.total > 0
    message = _small_request(a * 2, b + 1).SerializeToString()
    second = c.decode_message(message, memo)
    assert request_fields(second) == request_fields(c.decode_message(message))
    assert bytes(second.inputs[0].data) == (a * 2).tobytes()
    assert bytes(second.inputs[2].data) == (b + 1).tobytes()
    assert bytes(second.inputs[1].data) == np.array([5, 6], np.int32).tobytes()
    assert bytes(first.inputs[0].data) == a.tobytes()
    assert second.checked is first.checked is memo.checked


def test_memo_decodes_what_it_cannot_vouch_for():
    memo = RequestMemo()
    a, b = np.arange(4, dtype=np.float32), np.arange(3, dtype=np.int8)
    c.decode_message(_small_request(a, b).SerializeToString(), memo)
    # The same fields with the raw bytes split otherwise (as long in all): decoded, refused.
    request = _small_request(a, b)
    request.raw_input_contents[0] = a.tobytes()[:-1]
    request.raw_input_contents[1] = b.tobytes() + b"\0"
    with pytest.raises(ServerError, match="unexpected total byte size"):
        c.decode_message(request.SerializeToString(), memo)
    # Raw entries that are not the message's tail: decoded each time, not remembered.
    head = _small_request(a, b)
    del head.raw_input_contents[:]
    message = (
        pb.ModelInferRequest(raw_input_contents=[a.tobytes(), b.tobytes()]).SerializeToString()
        + head.SerializeToString()
    )
    fresh = RequestMemo()
    assert request_fields(c.decode_message(message, fresh)) == request_fields(
        c.decode_message(message)
    )
    assert fresh.total == -1
    # BYTES elements are checked against each request's bytes: never remembered.
    strings = serialize_byte_tensor(np.array([b"x", b"yz"], object)).item()
    message = request_with(("S", "BYTES", [2]), raw=[strings]).SerializeToString()
    c.decode_message(message, fresh)
    assert fresh.total == -1


def test_reply_memo_writes_the_same_bytes_as_protobuf():
    memo = RequestMemo()
    a, b = np.arange(4, dtype=np.float32), np.arange(3, dtype=np.int8)
    request = c.decode_message(_small_request(a, b).SerializeToString(), memo)
    request.outputs = [OutputRequest("O"), OutputRequest("S", False, {"shared_memory_region": "r"})]
    for o in (
        np.arange(6, dtype=np.float32),
        np.full(6, 2, np.float32),
        np.arange(2, dtype=np.float32),
    ):
        result = InferenceResult(
            "m",
            "",
            "x",
            [
                OutputTensor("O", "FP32", [1, o.size], o.tobytes()),
                OutputTensor("S", "FP32", [2], None),
            ],
        )
        message = c.serialize_infer_response(result, request, memo)
        assert message == c.encode_infer_response(result, request).SerializeToString()
        parsed = pb.ModelInferResponse.FromString(message)
        assert parsed.raw_output_contents == [o.tobytes(), b""]
    assert memo.reply is not None


# -- issue #12: bounds on what a request may make the frontend do ----------------------


def test_shape_numpy_cannot_build_is_refused_naming_the_input():
    message = invalid(request_with(("IN", "FP32", [0, 2**62]), raw=[b""]))
    assert message.startswith("byte size overflow for input 'IN': shape [0,4611686018427387904]")
    assert "it has 65 dimensions" in invalid(request_with(("IN", "FP32", [1] * 65), raw=[b"abcd"]))
    ok = c.decode_infer_request(request_with(("IN", "FP32", [0, 2**59]), raw=[b""]))
    assert ok.inputs[0].shape == [0, 2**59]


def _parse_error(data: bytes) -> str:
    with pytest.raises(ServerError) as info:
        c.parse_infer_request(data)
    assert info.value.code is Code.INVALID_ARG
    return info.value.message


def test_large_message_walk_refuses_non_messages_at_once():
    import time

    start = time.perf_counter()
    zeros = _parse_error(bytes(64 << 20))  # the old per-byte walk: ~6 s
    assert zeros == (
        "malformed ModelInferRequest: field 1 has field number 0 and wire type 0; no "
        "protobuf message has that"
    )
    tiny = b"\x2a\x00" * (32 << 20)  # 32 M empty 'inputs': protobuf alone takes ~7 s
    assert _parse_error(tiny) == (
        f"malformed ModelInferRequest: more than {c.MAX_FIELDS} top-level fields (inputs, "
        "outputs, raw_input_contents and parameters entries together)"
    )
    assert time.perf_counter() - start < 1.0  # ~5 ms here; generous for a loaded VM
    assert "wire type 3" in _parse_error(b"\x0b" + bytes(c.LARGE_MESSAGE))
    assert "past the end of the message" in _parse_error(
        b"\x3a\xff\xff\xff\x7f" + bytes(c.LARGE_MESSAGE)
    )
    assert "field 2 is cut off" in _parse_error(
        b"\x12\x80\x80\x04" + bytes(c.LARGE_MESSAGE) + b"\x3a\x80"
    )


def test_large_message_keeps_unknown_fields_and_raw_views():
    big = np.arange(c.LARGE_MESSAGE, dtype=np.uint8).tobytes()
    request = request_with(("A", "UINT8", [len(big)]), raw=[big], id="x")
    # unknown fields of every wire type, as a newer client might send
    extra = b"\x80\x01\x05" + b"\x89\x01" + bytes(8) + b"\x95\x01" + bytes(4) + b"\x9a\x01\x01z"
    message, raw = c.parse_infer_request(request.SerializeToString() + extra)
    assert raw is not None and bytes(raw[0]) == big
    decoded = c.decode_infer_request(message, raw)
    assert decoded.id == "x" and bytes(decoded.inputs[0].data) == big
