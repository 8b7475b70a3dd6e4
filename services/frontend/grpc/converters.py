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
"""

from __future__ import annotations

import base64
import struct

import numpy as np
import orjson
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb

from despina.common import dtypes
from despina.common.errors import internal, invalid_arg
from despina.services.frontend.inference import (
    InferenceRequest,
    InferenceResult,
    InputTensor,
    OutputRequest,
    ParamValue,
)

# A stream request parameter Triton reads itself: it asks for a flag on the final response.
ENABLE_FINAL_RESPONSE = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"

_LEN = struct.Struct("<I")
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

_SEQUENCE_FLAGS = ("sequence_start", "sequence_end")
_UINT_REQUEST_PARAMS = ("priority", "timeout")
_SHM_UINT_PARAMS = ("shared_memory_offset", "shared_memory_byte_size")


# -- inference request ----------------------------------------------------------------


def decode_infer_request(request: pb.ModelInferRequest) -> InferenceRequest:
    """Decode a ``ModelInferRequest`` into an ``InferenceRequest``.

    Raw input bytes are taken as they are (one copy, made by protobuf when the field is
    read); typed contents are converted to raw bytes. Raises INVALID_ARG for anything
    malformed; only that request fails.
    """
    model = request.model_name
    raw = request.raw_input_contents
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
        shape = tensor.shape[:]  # a list; faster than list(...) on upb containers
        count = 1
        for dim in shape:
            count *= dim
        if shape and min(shape) < 0:
            raise invalid_arg(
                f"unable to parse 'shape' of input '{name}': dimensions must be "
                f"non-negative integers, got {_show(shape)}"
            )
        parameters = _input_parameters(tensor.parameters, name) if tensor.parameters else {}
        data: bytes | None
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
                _check_bytes_elements(data, count, name, shape)
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


def _check_bytes_elements(data: bytes, count: int, name: str, shape: list[int]) -> None:
    """Walk the length prefixes of a raw BYTES input: it must hold exactly ``count``."""
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
        raise invalid_arg(
            f"unexpected number of string elements {found} for input '{name}', expecting "
            f"{count} for shape {_show(shape)}"
        )


# -- parameters -----------------------------------------------------------------------


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
        if key.startswith("triton_"):
            raise invalid_arg(
                f"parameter '{key}': keys starting with 'triton_' are reserved for Triton "
                "usage and should not be specified"
            )
        if key == "sequence_id":
            if not (type(value) is str or (type(value) is int and value >= 0)):
                raise invalid_arg(
                    "unable to parse 'sequence_id': it must be a non-negative integer or a "
                    f"string, got {value!r}"
                )
        elif key in _SEQUENCE_FLAGS:
            if type(value) is not bool:
                raise invalid_arg(
                    f"unable to parse '{key}': it must be a bool_param, got {value!r}"
                )
        elif key in _UINT_REQUEST_PARAMS:
            if type(value) is not int or value < 0:
                raise invalid_arg(
                    f"unable to parse '{key}': it must be a non-negative integer, got {value!r}"
                )
        out[key] = value
    return out


def _input_parameters(params, name: str) -> dict[str, ParamValue]:
    out: dict[str, ParamValue] = {}
    for key, param in params.items():
        value = _value(param, key)
        _check_io_parameter(key, value, "input", name)
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
            _check_io_parameter(key, value, "output", name)
        out[key] = value
    if "shared_memory_region" in out and "classification" in out:
        raise invalid_arg(
            f"output '{name}' can't set both 'shared_memory_region' and 'classification'"
        )
    return out


def _check_io_parameter(key: str, value: ParamValue, role: str, name: str) -> None:
    if key == "shared_memory_region":
        if type(value) is not str:
            raise invalid_arg(
                f"unable to parse 'shared_memory_region' of {role} '{name}': it must be a "
                f"string_param, got {value!r}"
            )
    elif key in _SHM_UINT_PARAMS:
        if type(value) is not int or value < 0:
            raise invalid_arg(
                f"unable to parse '{key}' of {role} '{name}': it must be a non-negative "
                f"integer, got {value!r}"
            )


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
) -> pb.ModelInferResponse:
    """Encode a result as a ``ModelInferResponse`` (into ``response`` when given, an
    empty one) with every output's bytes in ``raw_output_contents``, in output order. An
    output requested into a shared-memory region gets an empty entry: the data plane has
    already written it there.

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
    raw = response.raw_output_contents
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
        raw.append(data if type(data) is bytes else bytes(data))
    if result.parameters:
        encode_parameters(result.parameters, response.parameters)
    return response


def stream_response(
    result: InferenceResult, request: InferenceRequest, final_flag: bool
) -> pb.ModelStreamInferResponse:
    """A stream response; ``final_flag`` marks it ``triton_final_response`` (a request
    that set ``triton_enable_empty_final_response``: a non-decoupled model's only
    response is also its final one)."""
    response = pb.ModelStreamInferResponse()
    infer = encode_infer_response(result, request, response.infer_response)
    if final_flag:
        infer.parameters[FINAL_RESPONSE].bool_param = True
    return response


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


def wants_final_flag(request: pb.ModelInferRequest) -> bool:
    param = request.parameters.get(ENABLE_FINAL_RESPONSE)
    return param is not None and param.bool_param


# -- control plane: the data plane's JSON documents -> protobuf -----------------------


def server_metadata(body: bytes) -> pb.ServerMetadataResponse:
    return json_format.Parse(body, pb.ServerMetadataResponse(), ignore_unknown_fields=True)


def model_metadata(body: bytes) -> pb.ModelMetadataResponse:
    return json_format.Parse(body, pb.ModelMetadataResponse(), ignore_unknown_fields=True)


def model_config(body: bytes) -> pb.ModelConfigResponse:
    """``/config``'s JSON (Triton's JSON form of ``ModelConfig``) -> the protobuf."""
    response = pb.ModelConfigResponse()
    json_format.Parse(body, response.config, ignore_unknown_fields=True)
    return response


def repository_index(body: bytes, ready_only: bool) -> pb.RepositoryIndexResponse:
    """The repository index; ``ready_only`` keeps the READY model versions only."""
    response = pb.RepositoryIndexResponse()
    doc = orjson.loads(body)
    for entry in doc:
        if ready_only and entry.get("state") != "READY":
            continue
        json_format.ParseDict(entry, response.models.add(), ignore_unknown_fields=True)
    return response


def shm_status(body: bytes, cuda: bool):
    """The data plane's shared-memory status document -> System/CudaSharedMemoryStatusResponse."""
    response = (
        pb.CudaSharedMemoryStatusResponse() if cuda else pb.SystemSharedMemoryStatusResponse()
    )
    for entry in orjson.loads(body):
        json_format.ParseDict(entry, response.regions[entry["name"]], ignore_unknown_fields=True)
    return response


def cuda_shm_register_args(request: pb.CudaSharedMemoryRegisterRequest) -> dict:
    """The registration as the HTTP extension spells it (``raw_handle`` in base64)."""
    return {
        "raw_handle": {"b64": base64.b64encode(request.raw_handle).decode()},
        "device_id": request.device_id,
        "byte_size": request.byte_size,
    }


def _show(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
