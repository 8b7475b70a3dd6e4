"""KServe v2 JSON and Triton's binary tensor extension <-> the protocol-neutral records.

Pure functions, no I/O and no aiohttp: the routes hand over the request body and the
``Inference-Header-Content-Length`` header, and get back an ``InferenceRequest``; they
hand over an ``InferenceResult`` and get back the response body and that header. Every
malformed request raises ``ServerError(INVALID_ARG)`` naming the input or field to fix
(recoverable: only that request fails); an inconsistent result from a backend raises
``ServerError(INTERNAL)``. All functions are stateless and safe across tasks and threads.

Where Triton's behaviour and its protocol document disagree, this module follows
Triton's ``http_server.cc``, which is what ``tritonclient`` is tested against:

- The request parameter ``binary_data_output`` applies only to outputs the request did
  not list (all of them when it lists none); a listed output is binary only when its own
  ``binary_data`` says so.
- ``Inference-Header-Content-Length: 0`` is Triton's "raw binary" request: the whole
  body is the bytes of the model's one input, whose name, datatype and shape come from
  the model configuration (``decode_raw_request``); every output comes back binary.

Deliberately more lenient than Triton: FP16 and BF16 tensors may travel as JSON numbers
(Triton refuses both ways); BF16 is rounded to nearest even from the float32 value.
JSON numbers beyond the range of FP16, FP32 or BF16 become +-inf, as Triton's C cast
makes them (numpy notes it with a RuntimeWarning, once; where warnings are errors the
request fails with INVALID_ARG instead).
"""

from __future__ import annotations

import struct

import numpy as np
import orjson

from despina.common import dtypes
from despina.common.errors import DECOUPLED_UNARY, ServerError, internal, invalid_arg
from despina.services.frontend.inference import (
    InferenceRequest,
    InferenceResult,
    InputTensor,
    OutputRequest,
    ParamValue,
    RequestMemo,
    check_io_parameter,
    check_request_parameter,
    outputs_key,
)

HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"
# Infer responses this large go out from their parts (shared memory included), not
# joined into one bytes object; both HTTP transports use it.
STREAM_RESPONSE_BYTES = 1 << 20

_LEN = struct.Struct("<I")
_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY

# datatype -> (numpy dtype, item size); BYTES has item size 0 and an object dtype.
_TYPES: dict[str, tuple[np.dtype, int]] = {
    name: (dtypes.to_numpy(name), dtypes.item_size(name)) for name in dtypes.TRITON_TYPES
}
_INT_RANGES: dict[str, tuple[int, int]] = {
    name: (int(np.iinfo(dt).min), int(np.iinfo(dt).max))
    for name, (dt, _) in _TYPES.items()
    if dt.kind in "iu" and name != "BF16"
}
_FLOAT32 = np.dtype(np.float32)
_UINT16 = np.dtype(np.uint16)
_UINT32 = np.dtype(np.uint32)
_FLOAT_TYPES = frozenset(("FP16", "FP32", "FP64", "BF16"))
_MAX_DIMS = dtypes.MAX_DIMS
# Triton refuses request documents nested deeper than this (qa/L0_http's depth test).
MAX_JSON_DEPTH = 100
_MAX_DATA_DEPTH = MAX_JSON_DEPTH - 3
_MAX_ELEMENTS = dtypes.MAX_ELEMENTS

# Request parameters whose JSON type Triton checks at the HTTP edge.


# -- request ------------------------------------------------------------------------


def parse_header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as an int, None when absent.

    Raises INVALID_ARG when the value is not a non-negative decimal integer.
    """
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or not text.isascii():
        raise invalid_arg(
            f"unable to parse {HEADER_LENGTH_HEADER}, got: '{value}'; it must be the "
            "byte length of the JSON part of the body as a non-negative integer"
        )
    return int(text)


def decode_infer_request(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    model: str,
    version: str,
    memo: RequestMemo | None = None,
) -> InferenceRequest:
    """Decode an inference request body into an ``InferenceRequest``.

    ``header_length`` is the parsed ``Inference-Header-Content-Length`` (None when the
    header is absent and the whole body is JSON). Binary input data stays a zero-copy
    ``memoryview`` slice of ``body``, so the caller keeps ``body`` alive and unmodified
    for as long as the request is in use. JSON input data is converted to raw
    little-endian bytes (BYTES to the length-prefixed form).

    ``memo``: the connection's ``RequestMemo``, for a body in ``bytes`` with a binary
    header (its key): the request is rebuilt from it when the header and the body's
    length are the last one's again, and it remembers this one otherwise.

    Raises INVALID_ARG for anything malformed. A raw binary request (header length 0)
    needs the model's configuration: callers decode it with ``decode_raw_request``;
    here it is refused with INTERNAL. Only that request fails.
    """
    if memo is not None and header_length and type(body) is bytes:
        if header_length == len(memo.key) and memo.matches(body):
            return memo.rebuild(body, model, version)
        request = decode_infer_request(body, header_length, model, version)
        _remember(memo, body, header_length, request)
        return request
    total = len(body)
    if header_length is None:
        json_part: bytes | bytearray | memoryview = body
        view = None
    else:
        if header_length == 0:
            raise internal(
                f"a raw binary request ({HEADER_LENGTH_HEADER}: 0) reached the JSON "
                "decoder; it is decoded with the model's configuration"
            )
        if header_length < 0 or header_length > total:
            raise invalid_arg(
                f"inference header size should be in range (0, {total}], got: "
                f"{header_length}; {HEADER_LENGTH_HEADER} must not exceed the body length"
            )
        view = memoryview(body)
        json_part = view[:header_length] if header_length < total else body
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as e:
        if e.msg == "depth limit exceeded":
            raise invalid_arg(
                f"JSON nesting depth exceeds maximum allowed limit ({MAX_JSON_DEPTH})"
            ) from None
        raise invalid_arg(f"failed to parse the request JSON buffer: {e.msg} at {e.pos}") from None
    if type(doc) is not dict:
        raise invalid_arg(
            f"the request JSON must be an object with an 'inputs' array, got {_json_type(doc)}"
        )

    request_id = doc.get("id", "")
    if type(request_id) is not str:
        raise invalid_arg(
            f"unable to parse 'id': it must be a string, got {_json_type(request_id)}"
        )

    parameters: dict[str, ParamValue] = {}
    binary_output = False
    params_json = doc.get("parameters")
    if params_json is not None:
        parameters, binary_output = _request_parameters(params_json)

    inputs_json = doc.get("inputs")
    if type(inputs_json) is not list:
        raise invalid_arg(
            "unable to parse 'inputs': the request needs an 'inputs' array, "
            f"got {_json_type(inputs_json) if 'inputs' in doc else 'none'}"
        )
    offset = total if header_length is None else header_length
    inputs: list[InputTensor] = []
    seen: set[str] = set()
    for index, item in enumerate(inputs_json):
        tensor, size = _decode_input(item, index, view, offset, total)
        if tensor.name in seen:
            raise invalid_arg(f"input '{tensor.name}' is given more than once")
        seen.add(tensor.name)
        offset += size
        inputs.append(tensor)
    if offset != total:
        raise invalid_arg(
            f"unexpected additional input data for model '{model}': {total - offset} bytes "
            "follow the last binary input; each binary input's 'binary_data_size' must "
            "cover exactly its bytes"
        )

    outputs_json = doc.get("outputs")
    outputs = [] if outputs_json is None else _decode_outputs(outputs_json)

    # Positional: keyword arguments cost a slots dataclass twice as much on this path.
    return InferenceRequest(model, version, request_id, inputs, outputs, parameters, binary_output)


def decode_raw_request(
    body: bytes | bytearray | memoryview, config_json: bytes, model: str, version: str
) -> InferenceRequest:
    """Decode a raw binary request (``Inference-Header-Content-Length: 0``): ``body`` is
    the data of the model's only input, ``config_json`` the model's configuration as
    ``/config`` returns it. As Triton: the model has exactly one input; the input's
    datatype and dims come from its configuration, with a batch dimension of 1 when the
    model batches and the one variable-size dimension (if any) deduced from the body's
    size; a BYTES input must have dims [1] (the body is its one element). Every output
    comes back binary. The input data stays a view of ``body`` (a BYTES element is
    copied behind its length prefix).

    Raises INVALID_ARG, with Triton's wording, for a model with more or fewer than one
    input, more than one variable-size dimension, or a BYTES input whose shape is not
    [1]; a body whose size does not fit the deduced shape fails the usual byte-size
    check downstream. Only that request fails.
    """
    try:
        config = orjson.loads(config_json)
        inputs = config.get("input") or []
        batching = int(config.get("max_batch_size") or 0) != 0
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        raise internal(f"unreadable configuration of model '{model}'") from None
    if len(inputs) != 1:
        raise invalid_arg(
            f"Raw request must only have 1 input (found 1) to be deduced but got "
            f"{len(inputs)} inputs in '{model}' model configuration"
        )
    spec = inputs[0]
    name = str(spec.get("name", ""))
    datatype = dtypes.from_config_type(str(spec.get("data_type", "")))
    if datatype not in _TYPES:
        raise invalid_arg(f"raw input '{name}' has datatype {datatype} that has no binary form")
    item_size = _TYPES[datatype][1]
    dims = [int(d) for d in spec.get("dims") or []]
    shape = [1] if batching else []
    variable = -1
    count = 1
    for dim in dims:
        if dim == -1:
            if variable != -1:
                raise invalid_arg(
                    f"The shape of the raw input '{name}' can not be deduced because "
                    "there are more than one variable-sized dimension"
                )
            variable = len(shape)
        else:
            count *= dim
        shape.append(dim)
    size = len(body) if not isinstance(body, memoryview) else body.nbytes
    data: bytes | memoryview
    if datatype == "BYTES":
        if variable != -1 or count != 1:
            raise invalid_arg(
                f"For BYTE datatype raw input '{name}', the model must have input shape [1]"
            )
        data = _LEN.pack(size) + bytes(body)
    else:
        if variable != -1:
            shape[variable] = size // (count * item_size) if count else 0
        data = memoryview(body)
    if len(shape) > _MAX_DIMS:
        dtypes.check_dims(name, len(shape))
    expected = dtypes.element_count(shape) * item_size if item_size else None
    if expected is not None and expected != size:
        raise invalid_arg(
            f"unexpected total byte size {size} for raw input '{name}' of model "
            f"'{model}', expecting {expected} ({datatype} elements of shape {_show(shape)})"
        )
    tensor = InputTensor(name, datatype, shape, data, {})
    return InferenceRequest(model, version, "", [tensor], [], {}, True)


def _remember(memo: RequestMemo, body: bytes, header_length: int, req: InferenceRequest) -> None:
    """The header is the memo's key; the binary inputs' data follow it in order. BYTES
    elements are checked against each request's bytes: such a request is not kept."""
    spans: list[tuple[int, int] | None] = []
    offset = header_length
    for t in req.inputs:
        if type(t.data) is not memoryview:
            spans.append(None)
            continue
        if t.datatype == "BYTES":
            memo.forget()
            return
        spans.append((offset, offset + t.data.nbytes))
        offset += t.data.nbytes
    memo.remember(body, header_length, req, spans)


def _decode_input(
    item: object, index: int, view: memoryview | None, offset: int, total: int
) -> tuple[InputTensor, int]:
    """One entry of 'inputs' -> (tensor, bytes of binary data it consumed at ``offset``)."""
    if type(item) is not dict:
        raise invalid_arg(
            f"unable to parse input {index}: it must be an object, got {_json_type(item)}"
        )
    name = item.get("name")
    if type(name) is not str:
        raise invalid_arg(f"unable to parse 'name' of input {index}: it needs a 'name' string")
    datatype = item.get("datatype")
    if type(datatype) is not str:
        raise invalid_arg(
            f"unable to parse 'datatype' of input '{name}': it needs a 'datatype' string"
        )
    spec = _TYPES.get(datatype)
    if spec is None:
        raise invalid_arg(
            f"input '{name}' has unknown datatype '{datatype}'; expected one of "
            + ", ".join(dtypes.TRITON_TYPES)
        )
    shape = item.get("shape")
    if type(shape) is not list:
        raise invalid_arg(f"unable to parse 'shape' of input '{name}': it needs a 'shape' array")
    if len(shape) > _MAX_DIMS:
        dtypes.check_dims(name, len(shape))
    count = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            # Triton's words and status (500: its JSON reader's error) for this one.
            raise internal(
                "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as "
                f"unsigned-integer (input '{name}' has shape {_show(shape)}; dimensions "
                "must be non-negative integers)"
            )
        count *= dim
    if count > _MAX_ELEMENTS or not count:
        dtypes.check_shape(name, shape, count)

    params_json = item.get("parameters")
    if params_json is None:
        parameters: dict[str, ParamValue] = {}
        binary_size = None
    else:
        parameters, binary_size = _input_parameters(params_json, name)
    has_data = "data" in item
    has_region = "shared_memory_region" in parameters
    if has_data + (binary_size is not None) + has_region != 1:
        given = [
            label
            for label, present in (
                ("'data'", has_data),
                ("'binary_data_size'", binary_size is not None),
                ("'shared_memory_region'", has_region),
            )
            if present
        ]
        raise invalid_arg(
            f"input '{name}' must set exactly one of 'data', 'binary_data_size' in "
            "'parameters' or 'shared_memory_region' in 'parameters', but "
            + ("sets none" if not given else "sets " + " and ".join(given))
        )

    data: bytes | memoryview | None = None
    size = 0
    item_size = spec[1]
    if binary_size is not None:
        if view is None:
            raise invalid_arg(
                f"input '{name}' sets 'binary_data_size' but the request has no "
                f"{HEADER_LENGTH_HEADER} header; binary inputs need it to find where "
                "the JSON ends"
            )
        if item_size and binary_size != count * item_size:
            raise invalid_arg(
                f"unexpected total byte size {binary_size} for input '{name}', expecting "
                f"{count * item_size} ({count} {datatype} elements of shape {_show(shape)})"
            )
        end = offset + binary_size
        if end > total:
            raise invalid_arg(
                f"unexpected size for input '{name}': 'binary_data_size' is {binary_size} "
                f"but only {total - offset} bytes of binary data remain in the body"
            )
        data = view[offset:end]
        size = binary_size
        if not item_size:
            dtypes.check_bytes_elements(data, count, name, shape)
    elif has_data:
        data = _json_data_to_bytes(item["data"], datatype, spec[0], count, name, shape)
    return InputTensor(name, datatype, shape, data, parameters), size


def _request_parameters(params_json: object) -> tuple[dict[str, ParamValue], bool]:
    """Request 'parameters' -> (pass-through parameters, binary_data_output)."""
    if type(params_json) is not dict:
        raise invalid_arg(
            f"unable to parse 'parameters': it must be an object, got {_json_type(params_json)}"
        )
    binary_output = False
    out: dict[str, ParamValue] = {}
    for key, value in params_json.items():
        if key == "binary_data_output":
            if type(value) is not bool:
                raise invalid_arg(
                    "unable to parse 'binary_data_output': it must be true or false, "
                    f"got {_show(value)}"
                )
            binary_output = value
            continue
        check_request_parameter(key, value, _show, "true or false")
        if not _is_scalar(value):
            raise invalid_arg(
                f"parameter '{key}' has invalid type {_json_type(value)}; it should be an "
                "int, float, bool or string"
            )
        out[key] = value
    return out, binary_output


def _input_parameters(params_json: object, name: str) -> tuple[dict[str, ParamValue], int | None]:
    """An input's 'parameters' -> (parameters without binary_data_size, binary_data_size)."""
    if type(params_json) is not dict:
        raise invalid_arg(
            f"unable to parse 'parameters' of input '{name}': it must be an object, "
            f"got {_json_type(params_json)}"
        )
    binary_size = None
    out: dict[str, ParamValue] = {}
    for key, value in params_json.items():
        if key == "binary_data_size":
            if type(value) is not int or value < 0:
                raise invalid_arg(
                    f"unable to parse 'binary_data_size' of input '{name}': it must be a "
                    f"non-negative integer, got {_show(value)}"
                )
            binary_size = value
            continue
        _check_io_parameter(key, value, "input", name)
        out[key] = value
    return out, binary_size


def _decode_outputs(outputs_json: object) -> list[OutputRequest]:
    if type(outputs_json) is not list:
        raise invalid_arg(
            f"unable to parse 'outputs': it must be an array, got {_json_type(outputs_json)}"
        )
    outputs = []
    for index, item in enumerate(outputs_json):
        if type(item) is not dict:
            raise invalid_arg(
                f"unable to parse output {index}: it must be an object, got {_json_type(item)}"
            )
        name = item.get("name")
        if type(name) is not str:
            raise invalid_arg(f"unable to parse 'name' of output {index}: it needs a 'name' string")
        binary = False
        parameters: dict[str, ParamValue] = {}
        params_json = item.get("parameters")
        if params_json is not None:
            if type(params_json) is not dict:
                raise invalid_arg(
                    f"unable to parse 'parameters' of output '{name}': it must be an object, "
                    f"got {_json_type(params_json)}"
                )
            for key, value in params_json.items():
                if key == "binary_data":
                    if type(value) is not bool:
                        raise invalid_arg(
                            f"unable to parse 'binary_data' of output '{name}': it must be "
                            f"true or false, got {_show(value)}"
                        )
                    binary = value
                    continue
                if key == "classification":
                    if type(value) is not int or value < 0:
                        raise invalid_arg(
                            f"unable to parse 'classification' of output '{name}': it must be "
                            f"a non-negative integer, got {_show(value)}"
                        )
                else:
                    _check_io_parameter(key, value, "output", name)
                parameters[key] = value
            if "shared_memory_region" in parameters:
                if "classification" in parameters:
                    raise invalid_arg(
                        f"output '{name}' can't set both 'shared_memory_region' and "
                        "'classification'"
                    )
                if binary:
                    raise invalid_arg(
                        f"output '{name}' can't set both 'shared_memory_region' and 'binary_data'"
                    )
        outputs.append(OutputRequest(name, binary, parameters))
    return outputs


def _check_io_parameter(key: str, value: object, role: str, name: str) -> None:
    check_io_parameter(key, value, role, name, _show, "string")
    if not _is_scalar(value):
        raise invalid_arg(
            f"parameter '{key}' of {role} '{name}' has invalid type {_json_type(value)}; it "
            "should be an int, float, bool or string"
        )


def _json_data_to_bytes(
    data: object, datatype: str, dtype: np.dtype, count: int, name: str, shape: list[int]
) -> bytes:
    """JSON 'data' (flat or nested, any nesting) -> raw element bytes."""
    if type(data) is not list:
        raise invalid_arg(
            f"unable to parse 'data' of input '{name}': it must be an array, got {_json_type(data)}"
        )
    if datatype == "BYTES":
        return _json_strings_to_bytes(data, count, name, shape)
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        # Ragged nesting: Triton only counts elements, whatever the nesting.
        array = np.asarray(_flatten(data))
    if array.size != count:
        raise _count_error(name, count, shape, array.size)
    kind = array.dtype.kind
    if datatype in _FLOAT_TYPES:
        if kind not in "fiu" and count:
            raise _values_error(name, datatype, "numbers")
        try:
            if datatype == "BF16":
                return _float_to_bf16(array.astype(_FLOAT32)).tobytes()
            return array.astype(dtype, copy=False).tobytes()
        except RuntimeWarning:
            # Only when warnings are errors: numpy otherwise makes the value +-inf, as a
            # C cast would, and warns once.
            raise _values_error(name, datatype, "numbers within its range") from None
    if count == 0:
        return b""
    limits = _INT_RANGES.get(datatype)
    if limits is not None:
        if kind not in "iu":
            # numpy infers float64 or object for ints beyond int64 mixed with others.
            return _python_ints_to_bytes(data, datatype, dtype, limits, name)
        if array.dtype != dtype:
            if int(array.min()) < limits[0] or int(array.max()) > limits[1]:
                raise _values_error(name, datatype, f"integers from {limits[0]} to {limits[1]}")
            array = array.astype(dtype)
        return array.tobytes()
    if kind != "b":  # BOOL
        raise _values_error(name, datatype, "true or false")
    return array.tobytes()


def _python_ints_to_bytes(
    data: list, datatype: str, dtype: np.dtype, limits: tuple[int, int], name: str
) -> bytes:
    """Slow path for integer data numpy could not infer as integers."""
    flat = _flatten(data)
    if not all(type(x) is int for x in flat) or min(flat) < limits[0] or max(flat) > limits[1]:
        raise _values_error(name, datatype, f"integers from {limits[0]} to {limits[1]}")
    return np.array(flat, dtype=dtype).tobytes()


def _json_strings_to_bytes(data: list, count: int, name: str, shape: list[int]) -> bytes:
    flat = _flatten(data) if any(type(x) is list for x in data) else data
    if len(flat) != count:
        raise _count_error(name, count, shape, len(flat))
    for element in flat:
        if type(element) is not str:
            raise invalid_arg(
                f"unable to parse 'data' of input '{name}': BYTES elements must be JSON "
                f"strings, got {_json_type(element)}; send raw bytes as binary data"
            )
    array = np.empty(count, dtype=np.object_)
    array[:] = flat
    return dtypes.serialize_bytes(array)


def _float_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even (JSON holds no NaN)."""
    bits = values.view(_UINT32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(_UINT16)


def _flatten(data: list) -> list:
    """Elements of nested lists in row-major order. Raises INVALID_ARG, as Triton, when
    the nesting takes the request document past ``MAX_JSON_DEPTH`` levels (the data's
    array sits at level 4: the request object, its 'inputs' array, the input object)."""
    out: list = []
    stack = [iter(data)]
    while stack:
        for element in stack[-1]:
            if type(element) is list:
                if len(stack) >= _MAX_DATA_DEPTH:
                    raise invalid_arg(
                        f"JSON nesting depth exceeds maximum allowed limit ({MAX_JSON_DEPTH})"
                    )
                stack.append(iter(element))
                break
            out.append(element)
        else:
            stack.pop()
    return out


def _count_error(name: str, expected: int, shape: list[int], got: int) -> ServerError:
    return invalid_arg(
        f"unexpected number of elements for input '{name}': expected {expected} "
        f"(shape {_show(shape)}), got {got} in 'data'"
    )


def _values_error(name: str, datatype: str, wanted: str) -> ServerError:
    return invalid_arg(
        f"unable to parse 'data' of input '{name}': {datatype} elements must be {wanted}"
    )


def _is_scalar(value: object) -> bool:
    return type(value) in (str, int, float, bool)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if type(value) is bool:
        return "a boolean"
    if type(value) in (int, float):
        return "a number"
    if type(value) is str:
        return "a string"
    if type(value) is list:
        return "an array"
    return "an object"


def _show(value: object) -> str:
    try:
        text = orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- response -----------------------------------------------------------------------


def encode_infer_response(
    result: InferenceResult, request: InferenceRequest
) -> tuple[bytes, int | None]:
    """Encode a result as (body, Inference-Header-Content-Length or None): the parts of
    ``encode_infer_response_parts`` joined."""
    parts, header_length = encode_infer_response_parts(result, request)
    return b"".join(parts), header_length


def encode_infer_response_parts(
    result: InferenceResult, request: InferenceRequest, memo: RequestMemo | None = None
) -> tuple[list[bytes | memoryview], int | None]:
    """Encode a result as (body parts, Inference-Header-Content-Length or None). The
    parts are the JSON header, then each binary output's bytes as they are (views into
    shared memory included), so a large response can be written without joining it.

    The header length is None when every output travels as JSON. An output is binary
    when its ``OutputRequest`` says ``binary``, or, if the request did not list it,
    when the request asked for ``binary_output``. Binary outputs follow the JSON in
    output order, copied once into the body. An output requested into a shared-memory
    region carries neither data nor size: the data plane has already written it.

    BYTES elements are returned as JSON strings when they are valid UTF-8; an output
    holding any element that is not is sent as binary data instead (with its
    ``binary_data_size``), since a JSON string cannot carry it losslessly and clients
    such as tritonclient read either form.

    ``memo``: the connection's ``RequestMemo``; a response that repeats the last one's
    JSON (the same request template, outputs of the same names, types, shapes and sizes,
    all binary) reuses it.

    Raises INTERNAL when an output's bytes do not match its shape and datatype.
    """
    key = None
    if memo is not None and not result.parameters:
        key = (result.model, result.version, result.id, request.binary_output, outputs_key(result))
        reply = memo.reply
        if reply is not None and reply[0] is request.outputs and reply[1] == key:
            header, json_length, indices = reply[2:]
            outputs = result.outputs
            return [header, *[outputs[i].data for i in indices]], json_length
    parts, json_length, indices = _encode_parts(result, request)
    if key is not None and indices is not None:
        memo.reply = (request.outputs, key, parts[0], json_length, indices)  # type: ignore[union-attr]
    return parts, json_length


def _encode_parts(
    result: InferenceResult, request: InferenceRequest
) -> tuple[list[bytes | memoryview], int | None, list[int] | None]:
    """``encode_infer_response_parts`` without the memo; the third item lists the outputs
    whose bytes follow the JSON, or is None when an output's values are in the JSON."""
    requested = {o.name: o for o in request.outputs} if request.outputs else None
    outputs_json = []
    blobs: list[bytes | memoryview] = []
    indices: list[int] | None = []
    any_binary = False
    for index, output in enumerate(result.outputs):
        name, datatype, shape, data = output.name, output.datatype, output.shape, output.data
        wanted = requested.get(name) if requested is not None else None
        if wanted is None:
            binary = request.binary_output
        elif "shared_memory_region" in wanted.parameters:
            outputs_json.append({"name": name, "datatype": datatype, "shape": shape})
            continue
        else:
            binary = wanted.binary
        spec = _TYPES.get(datatype)
        if spec is None:
            raise internal(f"output '{name}' has unknown datatype '{datatype}'")
        size = data.nbytes if type(data) is memoryview else len(data)
        if spec[1] and size != spec[1] * dtypes.element_count(shape):
            raise internal(
                f"output tensor shape does not match size of output for '{name}': shape "
                f"{_show(shape)} of {datatype} needs {spec[1] * dtypes.element_count(shape)} "
                f"bytes, got {size}"
            )
        if not binary:
            values: np.ndarray | list[str] | None
            if datatype == "BYTES":
                values = _bytes_to_strings(name, shape, data)
            elif datatype == "BF16":
                values = (np.frombuffer(data, _UINT16).astype(_UINT32) << 16).view(_FLOAT32)
            else:
                values = np.frombuffer(data, spec[0])
            if values is not None:
                outputs_json.append(
                    {"name": name, "datatype": datatype, "shape": shape, "data": values}
                )
                indices = None
                continue
        outputs_json.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": shape,
                "parameters": {"binary_data_size": size},
            }
        )
        any_binary = True
        if size:
            blobs.append(data)
            if indices is not None:
                indices.append(index)

    doc: dict[str, object] = {"model_name": result.model, "model_version": result.version}
    if request.id:
        doc["id"] = request.id
    if result.parameters:
        doc["parameters"] = result.parameters
    doc["outputs"] = outputs_json
    try:
        header = orjson.dumps(doc, option=_DUMPS_OPTIONS)
    except orjson.JSONEncodeError as e:
        raise internal(
            f"failed to encode the response JSON for model '{result.model}': {e}"
        ) from None
    if not any_binary:
        return [header], None, indices
    return [header, *blobs], len(header), indices


def _bytes_to_strings(name: str, shape: list[int], data: bytes | memoryview) -> list[str] | None:
    count = dtypes.element_count(shape)
    view = data.cast("B") if type(data) is memoryview else data
    strings: list[str] = []
    pos, end = 0, len(view)
    while pos < end:
        if pos + 4 > end:
            raise _bytes_output_error(name, shape, count, end)
        (length,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + length > end:
            raise _bytes_output_error(name, shape, count, end)
        try:
            strings.append(str(view[pos : pos + length], "utf-8"))
        except UnicodeDecodeError:
            return None
        pos += length
    if len(strings) != count:
        raise _bytes_output_error(name, shape, count, end)
    return strings


def _bytes_output_error(name: str, shape: list[int], count: int, size: int) -> ServerError:
    return internal(
        f"output tensor shape does not match size of output for '{name}': shape "
        f"{_show(shape)} needs {count} length-prefixed BYTES elements, which its {size} "
        "bytes do not hold"
    )


# A decoupled model refuses a request outside a gRPC stream in gRPC's words
# (common/errors.DECOUPLED_UNARY); over HTTP Triton says this.
_DECOUPLED_HTTP = "HTTP end point doesn't support models with decoupled transaction policy"


def encode_error(message: str) -> bytes:
    """The HTTP error body Triton sends and tritonclient reads: ``{"error": message}``."""
    if message == DECOUPLED_UNARY:
        message = _DECOUPLED_HTTP
    return orjson.dumps({"error": message})
