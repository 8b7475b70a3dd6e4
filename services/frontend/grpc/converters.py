"""Triton's gRPC protobuf messages <-> the protocol-neutral records.

Pure functions, no I/O and no grpc import: the servicer hands over a decoded protobuf
message and gets back an ``InferenceRequest``; it hands over an ``InferenceResult`` and
gets back a ``ModelInferResponse``. Every malformed request raises
``ServerError(INVALID_ARG)`` naming the input or field to fix (recoverable: only that
request fails); an inconsistent result from a backend raises ``ServerError(INTERNAL)``.
All functions are stateless and safe across tasks and threads.

Input data comes in either of the two forms Triton accepts, per input:

- ``raw_input_contents``: one entry per input that carries data (inputs that name a
  shared-memory region have none), in input order; raw little-endian element bytes,
  BYTES in its 4-byte-length-prefixed form. This is what ``tritonclient`` sends, and
  the only form for FP16 and BF16.
- typed ``contents`` (``bool_contents``, ``int_contents``, ...), one field per data type
  as Triton's ``grpc_service.proto`` assigns them; BYTES elements go in
  ``bytes_contents`` and are serialized to the length-prefixed form here.

A request may mix the two (Triton refuses one that does; mixing is the only way to send
FP16 or BF16 beside typed inputs): raw entries go, in order, to the inputs that have
neither ``contents`` nor a shared-memory region, and there must be exactly one each.
Outputs always go back as ``raw_output_contents``, as Triton sends them.

Large messages skip protobuf's copies of tensor bytes (grpc.aio hands the servicer the
message bytes, and takes bytes back): ``parse_infer_request`` reads the
``raw_input_contents`` entries of a large request as views of the message, and
``serialize_infer_response`` writes large outputs' bytes straight after the rest of the
response, so each tensor is copied once on its way in and once on its way out.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from despina.common import dtypes
from despina.common.errors import internal, invalid_arg
from despina.common.protos import service_pb2 as pb
from despina.services.frontend.inference import (
    InferenceRequest,
    InferenceResult,
    InputTensor,
    OutputRequest,
    ParamValue,
    RequestMemo,
    check_io_parameter,
    check_request_parameter,
    forward_headers,
    outputs_key,
)

# A stream request parameter Triton reads itself: it asks for a flag on the final response.
ENABLE_FINAL_RESPONSE = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"

_ITEM_SIZE = {name: dtypes.item_size(name) for name in dtypes.TRITON_TYPES}

# datatype -> (typed contents field, numpy dtype of that field, numpy dtype of the tensor)
_CONTENTS: dict[str, tuple[str, np.dtype, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_), np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32), np.dtype(np.int8)),
    "INT16": ("int_contents", np.dtype(np.int32), np.dtype(np.int16)),
    "INT32": ("int_contents", np.dtype(np.int32), np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64), np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32), np.dtype(np.uint8)),
    "UINT16": ("uint_contents", np.dtype(np.uint32), np.dtype(np.uint16)),
    "UINT32": ("uint_contents", np.dtype(np.uint32), np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64), np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32), np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64), np.dtype(np.float64)),
    "BYTES": ("bytes_contents", np.dtype(np.object_), np.dtype(np.object_)),
}


MAX_ELEMENTS = dtypes.MAX_ELEMENTS
MAX_DIMS = dtypes.MAX_DIMS

# Messages at least this large take the path that leaves tensor bytes out of protobuf
# (below it, protobuf's C parser and serializer are cheaper than walking the wire format
# in Python). The frontend's inline threshold: smaller tensors are copied anyway.
LARGE_MESSAGE = 64 * 1024

# ModelInferRequest.raw_input_contents = 7, ModelInferResponse.raw_output_contents = 6,
# ModelStreamInferResponse.infer_response = 2: length-delimited (wire type 2).
_RAW_INPUT_FIELD = 7
_RAW_INPUT_KEY = b"\x3a"  # (7 << 3) | 2
_RAW_OUTPUT_KEY = b"\x32"  # (6 << 3) | 2
_STREAM_INFER_KEY = b"\x12"  # (2 << 3) | 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# The most top-level fields a large ModelInferRequest may have: a request has a handful
# plus two per input (its tensor and its raw entry) and one per output or parameter.
# ``_split_field`` walks them in Python (~0.3 µs each); protobuf's parser, run on a
# message of millions of tiny fields, would hold the loop for seconds.
MAX_FIELDS = 4096


def _split_field(data: bytes, field: int) -> tuple[bytes, list[memoryview]]:
    """Split the top-level entries of length-delimited ``field`` out of a serialized
    message: (the message without them, their payloads as views of ``data``).

    O(number of fields), never O(bytes): a length-delimited field is skipped by its
    length, a varint is at most 10 bytes, and the walk refuses more than ``MAX_FIELDS``
    fields. Raises INVALID_ARG for what is no protobuf message (field number 0, a group,
    an invalid wire type, a field cut off) or has too many fields."""
    view = memoryview(data)
    end = len(data)
    kept: list[memoryview] = []
    found: list[memoryview] = []
    pos = 0
    span = 0  # start of the bytes kept since the last entry taken out
    fields = 0
    while pos < end:
        fields += 1
        if fields > MAX_FIELDS:
            raise invalid_arg(
                f"malformed ModelInferRequest: more than {MAX_FIELDS} top-level fields "
                "(inputs, outputs, raw_input_contents and parameters entries together)"
            )
        start = pos
        key, pos = _read_varint(data, pos, end, fields)
        wire = key & 7
        if key >> 3 == 0 or wire not in (0, 1, 2, 5):
            raise invalid_arg(
                f"malformed ModelInferRequest: field {fields} has field number {key >> 3} "
                f"and wire type {wire}; no protobuf message has that"
            )
        if wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            continue
        value, pos = _read_varint(data, pos, end, fields)  # the value (wire 0), the length (2)
        if wire == 0:
            continue
        if value > end - pos:
            raise invalid_arg(
                f"malformed ModelInferRequest: field {fields} declares {value} bytes, past "
                "the end of the message"
            )
        if key >> 3 == field:
            if span < start:
                kept.append(view[span:start])
            found.append(view[pos : pos + value])
            span = pos + value
        pos += value
    if pos != end:
        raise invalid_arg(f"malformed ModelInferRequest: field {fields} is cut off")
    if not found:
        return data, found
    kept.append(view[span:end])
    return b"".join(kept), found


def _read_varint(data: bytes, pos: int, end: int, fields: int) -> tuple[int, int]:
    """The varint at ``pos`` (a tag, a value or a length) and the position after it;
    INVALID_ARG when it is cut off or longer than 10 bytes (``fields``: which field, for
    the message)."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise invalid_arg(f"malformed ModelInferRequest: field {fields} is cut off")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def parse_infer_request(data: bytes) -> tuple[pb.ModelInferRequest, list[memoryview] | None]:
    """Parse a serialized ``ModelInferRequest``. For a large message, the
    ``raw_input_contents`` entries are left out of the protobuf message and returned as
    views of ``data`` (for ``decode_infer_request``); otherwise the second item is None.
    A large message's top level is walked first (``_split_field``), so that protobuf
    parses only its metadata; a small one is protobuf's alone.

    Raises INVALID_ARG when the bytes are no ModelInferRequest or it has more than
    ``MAX_FIELDS`` top-level fields.
    """
    raw: list[memoryview] | None = None
    if len(data) >= LARGE_MESSAGE:
        data, raw = _split_field(data, _RAW_INPUT_FIELD)
    try:
        return pb.ModelInferRequest.FromString(data), raw
    except DecodeError as exc:
        raise invalid_arg(f"malformed ModelInferRequest: {exc}") from None


def decode_message(data: bytes, memo: RequestMemo | None = None) -> InferenceRequest:
    """``parse_infer_request`` then ``decode_infer_request``. ``memo``: a small message
    that repeats the last one's fields but for ``raw_input_contents`` (its key, with the
    entries' tags and lengths) is rebuilt from it; otherwise it remembers this one."""
    if memo is not None and len(data) < LARGE_MESSAGE:
        if memo.matches(data):
            return memo.rebuild(data, memo.model, memo.version)
        message, raw = parse_infer_request(data)
        request = decode_infer_request(message, raw)
        _remember(memo, data, message, request)
        return request
    message, raw = parse_infer_request(data)
    return decode_infer_request(message, raw)


def _remember(
    memo: RequestMemo, data: bytes, message: pb.ModelInferRequest, request: InferenceRequest
) -> None:
    """Kept when the raw input entries are the message's tail (as protobuf serializes
    fields, in number order): the rest of the message is the memo's key, the entries'
    tags and lengths its marks. BYTES elements are checked against each request's
    bytes: such a request is not kept."""
    memo.forget()
    raw_inputs = []  # (index, size) of each input with raw contents, in order
    for index, (tensor, decoded) in enumerate(zip(message.inputs, request.inputs)):
        if decoded.data is None or tensor.HasField("contents"):
            continue
        if decoded.datatype == "BYTES":
            return
        raw_inputs.append((index, len(decoded.data)))
    heads = [_RAW_INPUT_KEY + _varint(size) for _, size in raw_inputs]
    offset = len(data) - sum(len(head) + size for head, (_, size) in zip(heads, raw_inputs))
    spans: list[tuple[int, int] | None] = [None] * len(request.inputs)
    marks = []
    key_length = offset
    for head, (index, size) in zip(heads, raw_inputs):
        if offset < 0 or not data.startswith(head, offset):
            return  # fields in another order: decoded each time
        marks.append((offset, head))
        offset += len(head)
        spans[index] = (offset, offset + size)
        offset += size
    memo.remember(data, key_length, request, spans, marks)


# -- inference request ----------------------------------------------------------------


def decode_infer_request(
    request: pb.ModelInferRequest, raw_inputs: list[memoryview] | None = None
) -> InferenceRequest:
    """Decode a ``ModelInferRequest`` into an ``InferenceRequest``.

    Raw input bytes are taken as they are: ``raw_inputs`` when given (views of the
    message, which ``parse_infer_request`` left out of ``request``), else the message's
    own ``raw_input_contents`` (one copy, made by protobuf when the field is read); typed
    contents are converted to raw bytes. Raises INVALID_ARG for anything malformed; only
    that request fails.
    """
    model = request.model_name
    raw: list[memoryview] | Any = request.raw_input_contents if raw_inputs is None else raw_inputs
    raw_count = len(raw)
    raw_index = 0
    inputs: list[InputTensor] = []
    # Duplicate input names are the scheduler's check, as for HTTP.
    for tensor in request.inputs:
        name = tensor.name
        datatype = tensor.datatype
        item_size = _ITEM_SIZE.get(datatype)
        if item_size is None:
            raise invalid_arg(
                f"input '{name}' has unknown datatype '{datatype}'; expected one of "
                + ", ".join(dtypes.TRITON_TYPES)
            )
        if len(tensor.shape) > MAX_DIMS:
            dtypes.check_dims(name, len(tensor.shape))
        shape = tensor.shape[:]  # a list; faster than list(...) on upb containers
        count = 1
        for dim in shape:
            count *= dim
        if shape and min(shape) < 0:
            raise invalid_arg(
                f"unable to parse 'shape' of input '{name}': dimensions must be "
                f"non-negative integers, got {_show(shape)}"
            )
        if count > MAX_ELEMENTS or not count:
            dtypes.check_shape(name, shape, count)
        parameters = _input_parameters(tensor.parameters, name) if tensor.parameters else {}
        data: bytes | memoryview | None
        if "shared_memory_region" in parameters:
            if tensor.HasField("contents"):
                raise invalid_arg(
                    f"input '{name}' sets both 'contents' and 'shared_memory_region'; "
                    "give its data one way"
                )
            data = None
        elif tensor.HasField("contents"):
            data = _typed_contents(tensor.contents, datatype, count, name, shape)
        else:
            if raw_index >= raw_count:
                raise invalid_arg(
                    f"input '{name}' has no data: give it an entry in raw_input_contents "
                    "(one per input that has neither 'contents' nor a shared-memory region, "
                    "in input order), typed 'contents' or a 'shared_memory_region' parameter"
                )
            data = raw[raw_index]
            raw_index += 1
            size = len(data)
            if item_size:
                if size != item_size * count:
                    raise invalid_arg(
                        f"unexpected total byte size {size} for input '{name}', expecting "
                        f"{item_size * count} ({count} {datatype} elements of shape "
                        f"{_show(shape)})"
                    )
            else:
                dtypes.check_bytes_elements(data, count, name, shape)
        inputs.append(InputTensor(name, datatype, shape, data, parameters))
    if raw_index != raw_count:
        raise invalid_arg(
            f"raw_input_contents holds {raw_count} entries but the request's inputs use "
            f"{raw_index}; give exactly one entry per input that has neither 'contents' nor "
            "a shared-memory region, in input order"
        )

    outputs = [
        OutputRequest(
            o.name, False, _output_parameters(o.parameters, o.name) if o.parameters else {}
        )
        for o in request.outputs
    ]
    parameters = _request_parameters(request.parameters) if request.parameters else {}
    # Positional: keyword arguments cost a slots dataclass twice as much on this path.
    return InferenceRequest(
        model, request.model_version, request.id, inputs, outputs, parameters, False
    )


def _typed_contents(
    contents: pb.InferTensorContents, datatype: str, count: int, name: str, shape: list[int]
) -> bytes:
    spec = _CONTENTS.get(datatype)
    if spec is None:
        raise invalid_arg(
            f"input '{name}' is {datatype}, which has no typed 'contents' field; send its "
            "data in raw_input_contents"
        )
    field, wire_dtype, dtype = spec
    values = getattr(contents, field)
    if len(values) != count:
        raise invalid_arg(
            f"unexpected number of elements for input '{name}': expected {count} (shape "
            f"{_show(shape)}) in 'contents.{field}', got {len(values)}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return dtypes.serialize_bytes(array)
    array = np.array(values, dtype=wire_dtype)
    if dtype != wire_dtype:
        info = np.iinfo(dtype)
        if count and (int(array.min()) < info.min or int(array.max()) > info.max):
            raise invalid_arg(
                f"unable to parse 'contents' of input '{name}': {datatype} elements must be "
                f"integers from {info.min} to {info.max}"
            )
        array = array.astype(dtype)
    return array.tobytes()


def _value(param: pb.InferParameter, key: str) -> ParamValue:
    kind = param.WhichOneof("parameter_choice")
    if kind is None:
        raise invalid_arg(
            f"parameter '{key}' has no value; set one of bool_param, int64_param, "
            "uint64_param, double_param or string_param"
        )
    value: ParamValue = getattr(param, kind)
    return value


def _request_parameters(params) -> dict[str, ParamValue]:  # a protobuf map
    out: dict[str, ParamValue] = {}
    for key, param in params.items():
        if key == ENABLE_FINAL_RESPONSE:
            continue  # read by the stream handler
        value = _value(param, key)
        check_request_parameter(key, value, repr, "a bool_param")
        out[key] = value
    return out


def _input_parameters(params, name: str) -> dict[str, ParamValue]:
    out: dict[str, ParamValue] = {}
    for key, param in params.items():
        value = _value(param, key)
        check_io_parameter(key, value, "input", name, repr, "string_param")
        out[key] = value
    return out


def _output_parameters(params, name: str) -> dict[str, ParamValue]:
    out: dict[str, ParamValue] = {}
    for key, param in params.items():
        value = _value(param, key)
        if key == "classification":
            if type(value) is not int or value < 0:
                raise invalid_arg(
                    f"unable to parse 'classification' of output '{name}': it must be a "
                    f"non-negative integer, got {value!r}"
                )
        else:
            check_io_parameter(key, value, "output", name, repr, "string_param")
        out[key] = value
    if "shared_memory_region" in out and "classification" in out:
        raise invalid_arg(
            f"output '{name}' can't set both 'shared_memory_region' and 'classification'"
        )
    return out


def encode_parameters(params: dict[str, ParamValue], target) -> None:  # a protobuf map
    """Write ``params`` into a protobuf ``map<string, InferParameter>``."""
    for key, value in params.items():
        param = target[key]
        if type(value) is bool:
            param.bool_param = value
        elif type(value) is int:
            if value >= 1 << 63:
                param.uint64_param = value
            else:
                param.int64_param = value
        elif type(value) is float:
            param.double_param = value
        else:
            param.string_param = str(value)


# -- inference response ---------------------------------------------------------------


def encode_infer_response(
    result: InferenceResult,
    request: InferenceRequest,
    response: pb.ModelInferResponse | None = None,
    raw_out: list | None = None,
) -> pb.ModelInferResponse:
    """Encode a result as a ``ModelInferResponse`` (into ``response`` when given, an
    empty one) with every output's bytes in ``raw_output_contents``, in output order. An
    output requested into a shared-memory region gets an empty entry: the data plane has
    already written it there. With ``raw_out`` (a list), the entries are appended to it
    instead and the message has none: ``serialize_infer_response`` writes them after it.

    Raises INTERNAL when an output's bytes do not match its shape and datatype.
    """
    if response is None:
        response = pb.ModelInferResponse(
            model_name=result.model, model_version=result.version, id=request.id
        )
    else:
        response.model_name = result.model
        response.model_version = result.version
        response.id = request.id
    in_shm = (
        {o.name for o in request.outputs if "shared_memory_region" in o.parameters}
        if request.outputs
        else None
    )
    add = response.outputs.add
    raw: Any = response.raw_output_contents if raw_out is None else raw_out
    for output in result.outputs:
        name, datatype, shape, data = output.name, output.datatype, output.shape, output.data
        add(name=name, datatype=datatype, shape=shape)
        if data is None or (in_shm and name in in_shm):
            raw.append(b"")  # written into the client's region; the entry keeps the order
            continue
        item_size = _ITEM_SIZE.get(datatype)
        if item_size is None:
            raise internal(f"output '{name}' has unknown datatype '{datatype}'")
        size = data.nbytes if type(data) is memoryview else len(data)
        if item_size and size != item_size * dtypes.element_count(shape):
            raise internal(
                f"output tensor shape does not match size of output for '{name}': shape "
                f"{_show(shape)} of {datatype} needs {item_size * dtypes.element_count(shape)} "
                f"bytes, got {size}"
            )
        raw.append(data if type(data) is bytes or raw_out is not None else bytes(data))
    if result.parameters:
        encode_parameters(result.parameters, response.parameters)
    return response


def _output_bytes(result: InferenceResult) -> int:
    total = 0
    for output in result.outputs:
        data = output.data
        if data is not None:
            total += data.nbytes if type(data) is memoryview else len(data)
    return total


def _raw_entries(parts: list, raw: list) -> int:
    """Append ``raw_output_contents`` entries (key, length, bytes) to ``parts``; returns
    their encoded size."""
    size = 0
    for data in raw:
        n = data.nbytes if type(data) is memoryview else len(data)
        length = _varint(n)
        parts += (_RAW_OUTPUT_KEY, length, data)
        size += 1 + len(length) + n
    return size


def serialize_infer_response(
    result: InferenceResult, request: InferenceRequest, memo: RequestMemo | None = None
) -> bytes:
    """``encode_infer_response``, serialized. Large outputs are copied once, straight
    from where they are (a backend host's shared memory) into the message bytes.
    ``memo``: the servicer's ``RequestMemo``; a small response that repeats the last
    one's fields (the same request template, outputs of the same names, types, shapes
    and sizes) reuses them, followed by this one's ``raw_output_contents``."""
    if _output_bytes(result) < LARGE_MESSAGE:
        if memo is None or result.parameters:
            return encode_infer_response(result, request).SerializeToString()
        key = (result.model, result.version, request.id, outputs_key(result))
        reply = memo.reply
        if reply is None or reply[0] is not request.outputs or reply[1] != key:
            entries: list = []
            head = encode_infer_response(result, request, None, entries).SerializeToString()
            # Outputs written into a client region have an empty entry (see encode).
            empty = [i for i, data in enumerate(entries) if type(data) is bytes and not data]
            reply = memo.reply = (request.outputs, key, head, empty)
        entries = [o.data for o in result.outputs]
        for i in reply[3]:
            entries[i] = b""
        message: list = [reply[2]]
        _raw_entries(message, entries)
        return b"".join(message)
    raw: list = []
    head = encode_infer_response(result, request, None, raw).SerializeToString()
    parts: list = [head]
    _raw_entries(parts, raw)
    return b"".join(parts)


def stream_response(
    result: InferenceResult, request: InferenceRequest, final_flag: bool, last: bool = True
) -> pb.ModelStreamInferResponse:
    """A stream response; ``final_flag`` (a request that set
    ``triton_enable_empty_final_response``) adds ``triton_final_response``: ``last``,
    true for a non-decoupled model's only response, false for a decoupled model's
    responses before its last."""
    response = pb.ModelStreamInferResponse()
    infer = encode_infer_response(result, request, response.infer_response)
    if final_flag:
        infer.parameters[FINAL_RESPONSE].bool_param = last
    return response


def serialize_stream_response(
    result: InferenceResult, request: InferenceRequest, final_flag: bool, last: bool = True
) -> bytes:
    """``stream_response``, serialized; large outputs as in ``serialize_infer_response``."""
    if _output_bytes(result) < LARGE_MESSAGE:
        return stream_response(result, request, final_flag, last).SerializeToString()
    raw: list = []
    infer = encode_infer_response(result, request, None, raw)
    if final_flag:
        infer.parameters[FINAL_RESPONSE].bool_param = last
    head = infer.SerializeToString()
    parts: list = [_STREAM_INFER_KEY, b"", head]
    size = len(head) + _raw_entries(parts, raw)
    parts[1] = _varint(size)
    return b"".join(parts)


def stream_error(message: str, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
    """A stream response that carries an error: the stream itself stays open. The
    ``infer_response`` names the request (id, model, version) so the client can tell
    which one failed."""
    response = pb.ModelStreamInferResponse(error_message=message)
    infer = response.infer_response
    infer.model_name = request.model_name
    infer.model_version = request.model_version
    infer.id = request.id
    return response


# The request header (gRPC metadata) by which a ModelStreamInfer client asks for Triton's
# "triton_grpc_error" mode: a request's error ends the stream with its gRPC status.
GRPC_ERROR_HEADER = "triton_grpc_error"


def wants_grpc_error(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether a stream's metadata (``context.invocation_metadata()``) sets
    ``triton_grpc_error: true`` (the value compared case-insensitively)."""
    for key, value in metadata or ():
        if key == GRPC_ERROR_HEADER:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            return text.strip().lower() == "true"
    return False


def forward_metadata(request: InferenceRequest, context: Any, forward: re.Pattern[str]) -> None:
    """Add the call's metadata whose key ``forward`` matches (--grpc-header-forward-pattern)
    to ``request``'s parameters as strings (``inference.forward_headers``: raises
    INVALID_ARG for a reserved name). Binary (``-bin``) values and Triton's own
    ``triton_grpc_error`` switch are not forwarded."""
    forwarded = {
        key: value
        for key, value in context.invocation_metadata() or ()
        if type(value) is str and key != GRPC_ERROR_HEADER and forward.search(key) is not None
    }
    if forwarded:
        forward_headers(request, forwarded)


def wants_final_flag(request: pb.ModelInferRequest) -> bool:
    param = request.parameters.get(ENABLE_FINAL_RESPONSE)
    return param is not None and param.bool_param


# -- control plane (the records' encoders are services/frontend/control.py) ---------------


def cuda_shm_register_args(request: pb.CudaSharedMemoryRegisterRequest) -> dict:
    """The registration as the HTTP extension spells it (``raw_handle`` in base64)."""
    return {
        "raw_handle": {"b64": base64.b64encode(request.raw_handle).decode()},
        "device_id": request.device_id,
        "byte_size": request.byte_size,
    }


def _show(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
