"""``triton_python_backend_utils`` as a Triton ``model.py`` imports it (``pb_utils``).

The loader installs this module in ``sys.modules`` under the name
``triton_python_backend_utils`` before it imports a model, so ``import
triton_python_backend_utils as pb_utils`` runs unchanged. Names, signatures and
behaviour follow Triton's python_backend (the pybind classes of ``pb_stub.cc`` plus the
pure-Python helpers of ``src/resources/triton_python_backend_utils.py``).

Tensors here are plain numpy arrays held by reference: an input ``Tensor`` wraps the
array the backend host mapped (often a read-only view onto shared memory), and an output
``Tensor`` keeps the model's array, so nothing is copied on the way in or out.

Decoupled mode: ``request.get_response_sender()`` gives an ``InferenceResponseSender``
(the backend makes one per request of a decoupled model). Features of later work (BLS
``exec``, custom metrics,
model loading API) exist as names so a model
imports cleanly, and raise ``TritonModelException("... is not supported by Despina
yet")`` when used. Nothing in this module is shared across threads by the backend; an
instance runs one batch at a time.
"""

from __future__ import annotations

import enum
import json
import logging
import struct
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

# Request, response and release flags (TRITONSERVER_RequestFlag and friends).
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2

# Memory kinds for PreferredMemory (only CPU is served today).
TRITONSERVER_MEMORY_CPU = 0
TRITONSERVER_MEMORY_GPU = 2

TRITON_STRING_TO_NUMPY: dict[str, type] = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}

# TRITONSERVER_DataType codes, as Tensor.triton_dtype() returns them.
TYPE_BOOL, TYPE_UINT8, TYPE_UINT16, TYPE_UINT32, TYPE_UINT64 = 1, 2, 3, 4, 5
TYPE_INT8, TYPE_INT16, TYPE_INT32, TYPE_INT64 = 6, 7, 8, 9
TYPE_FP16, TYPE_FP32, TYPE_FP64, TYPE_BYTES, TYPE_BF16 = 10, 11, 12, 13, 14

_CODE_TO_NUMPY: dict[int, type] = {
    TYPE_BOOL: np.bool_,
    TYPE_UINT8: np.uint8,
    TYPE_UINT16: np.uint16,
    TYPE_UINT32: np.uint32,
    TYPE_UINT64: np.uint64,
    TYPE_INT8: np.int8,
    TYPE_INT16: np.int16,
    TYPE_INT32: np.int32,
    TYPE_INT64: np.int64,
    TYPE_FP16: np.float16,
    TYPE_FP32: np.float32,
    TYPE_FP64: np.float64,
    TYPE_BYTES: np.object_,
}
_NUMPY_TO_CODE: dict[np.dtype, int] = {
    np.dtype(t): code for code, t in _CODE_TO_NUMPY.items() if code != TYPE_BYTES
}

_NOT_YET = "is not supported by Despina yet"


class TritonModelException(Exception):
    """What ``pb_utils`` raises when a model misuses the API; a model may raise it too."""

    def __init__(self, msg: str = "") -> None:
        super().__init__(msg)
        self._msg = msg

    def message(self) -> str:
        return self._msg


def _not_supported(feature: str) -> TritonModelException:
    return TritonModelException(f"{feature} {_NOT_YET}")


# ---------------------------------------------------------------------------------------
# Type helpers (module functions of Triton's triton_python_backend_utils.py)


def triton_string_to_numpy(triton_type_string: str) -> type:
    """``"TYPE_FP32"`` -> ``np.float32``; raises KeyError for an unknown name, as Triton."""
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def triton_to_numpy_type(data_type: int) -> type | None:
    """TRITONSERVER_DataType code -> numpy type; None when it has none (BF16, unknown)."""
    return _CODE_TO_NUMPY.get(data_type)


def numpy_to_triton_type(data_type: Any) -> int | None:
    """numpy type or dtype -> TRITONSERVER_DataType code; None when Triton has none."""
    try:
        dtype = np.dtype(data_type)
    except TypeError:
        return None
    if dtype.kind in ("O", "S"):
        return TYPE_BYTES
    return _NUMPY_TO_CODE.get(dtype)


_LEN = struct.Struct("<I")


def serialize_byte_tensor(input_tensor: np.ndarray) -> bytes | None:
    """Flatten a BYTES tensor (object or ``np.bytes_`` array) in C order into
    length-prefixed bytes: each element is a 4-byte little-endian length, then its bytes.
    Elements that are not ``bytes`` are ``str()``-ed and UTF-8 encoded. Returns ``b""``
    for an empty tensor and None for a tensor of any other dtype, as Triton does.
    """
    if input_tensor.size == 0:
        return b""
    kind = input_tensor.dtype.kind
    if kind not in ("O", "S"):
        return None
    parts: list[bytes] = []
    for item in input_tensor.reshape(-1, order="C"):
        if kind == "O" and not isinstance(item, bytes):
            item = str(item).encode("utf-8")
        parts.append(_LEN.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def deserialize_bytes_tensor(encoded_tensor: Any) -> np.ndarray:
    """Parse length-prefixed bytes (``bytes``, or any buffer such as a uint8 array) into
    a 1-D object array of ``bytes``.

    Raises TritonModelException when the buffer is truncated.
    """
    view = memoryview(encoded_tensor).cast("B")
    items: list[bytes] = []
    pos, end = 0, len(view)
    while pos < end:
        if pos + 4 > end:
            raise TritonModelException("malformed BYTES tensor: truncated element length")
        (length,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + length > end:
            raise TritonModelException("malformed BYTES tensor: element runs past the end")
        items.append(bytes(view[pos : pos + length]))
        pos += length
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


# ---------------------------------------------------------------------------------------
# Errors


class _ErrorCode(enum.IntEnum):
    """TRITONSERVER_Error_Code values, as ``TritonError.code()`` returns them."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7


class TritonError:
    """An error to put in an ``InferenceResponse``; the client sees ``message`` with the
    status that ``code`` maps to (INTERNAL unless the model says otherwise)."""

    __slots__ = ("_message", "_code")

    UNKNOWN = _ErrorCode.UNKNOWN
    INTERNAL = _ErrorCode.INTERNAL
    NOT_FOUND = _ErrorCode.NOT_FOUND
    INVALID_ARG = _ErrorCode.INVALID_ARG
    UNAVAILABLE = _ErrorCode.UNAVAILABLE
    UNSUPPORTED = _ErrorCode.UNSUPPORTED
    ALREADY_EXISTS = _ErrorCode.ALREADY_EXISTS
    CANCELLED = _ErrorCode.CANCELLED

    def __init__(self, message: str, code: int = _ErrorCode.INTERNAL) -> None:
        if message is None:
            raise TypeError("TritonError message must not be None")
        try:
            self._code = _ErrorCode(code)
        except ValueError:
            raise TypeError(
                f"TritonError code must be one of TritonError's codes, got {code!r}"
            ) from None
        self._message = str(message)

    def message(self) -> str:
        return self._message

    def code(self) -> _ErrorCode:
        return self._code

    def __str__(self) -> str:
        return self._message

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, {self._code.name})"


# ---------------------------------------------------------------------------------------
# Tensors


class _DLPackCapsule:
    """Lets ``np.from_dlpack`` consume a bare DLPack capsule (it wants ``__dlpack__``)."""

    def __init__(self, capsule: object) -> None:
        self._capsule = capsule

    def __dlpack__(self, stream: object = None, **_: object) -> object:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU; a GPU capsule makes numpy refuse, which we report


class Tensor:
    """A named tensor: a request input or a response output.

    ``Tensor(name, numpy_array)`` keeps a reference to the array (made C-contiguous if it
    was not); ``as_numpy()`` returns it. Unicode (``np.str_``) arrays, which Triton
    rejects, are accepted and stored as an object array of UTF-8 ``bytes``.
    """

    __slots__ = ("_name", "_array", "_dtype")
    _name: str
    _array: np.ndarray
    _dtype: int

    def __init__(self, name: str, numpy_array: Any) -> None:
        if not isinstance(name, str) or name == "":
            raise TritonModelException("Tensor name cannot be an empty string.")
        array = numpy_array if isinstance(numpy_array, np.ndarray) else np.asarray(numpy_array)
        if array.dtype.kind == "U":
            encoded = np.empty(array.shape, dtype=np.object_)
            encoded.reshape(-1)[:] = [s.encode("utf-8") for s in array.reshape(-1).tolist()]
            array = encoded
        code = _NUMPY_TO_CODE.get(array.dtype) or numpy_to_triton_type(array.dtype)
        if code is None:
            raise TritonModelException(
                f"Tensor '{name}': numpy dtype {array.dtype} is not supported by the Python "
                "backend. Use a numeric dtype, or np.object_ for BYTES."
            )
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        self._name = name
        self._array = array
        self._dtype = code

    @classmethod
    def _wrap(cls, name: str, array: np.ndarray, dtype: int = 0) -> Tensor:
        """Backend fast path for inputs: no checks, no copy. ``dtype`` 0 means "derive
        from the array" (BF16 inputs arrive as uint16 and pass TYPE_BF16)."""
        tensor = cls.__new__(cls)
        tensor._name = name
        tensor._array = array
        tensor._dtype = dtype
        return tensor

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def triton_dtype(self) -> int:
        """TRITONSERVER_DataType code (``TYPE_FP32`` is 11, ``TYPE_BYTES`` 13, ...)."""
        if not self._dtype:
            self._dtype = numpy_to_triton_type(self._array.dtype) or 0
        return self._dtype

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self) -> object:
        """A DLPack capsule over the tensor's memory (zero copy), e.g. for
        ``torch.utils.dlpack.from_dlpack``. Read-only inputs (shared-memory views) are
        copied first: legacy DLPack capsules cannot say "read-only"."""
        return self.__dlpack__()

    def __dlpack__(self, stream: object = None, **kwargs: Any) -> object:
        if self.triton_dtype() == TYPE_BYTES:
            raise TritonModelException("DLPack does not have support for string tensors.")
        try:
            return self._array.__dlpack__(stream=stream, **kwargs)
        except BufferError:
            if self._array.flags.writeable:
                raise
            self._array = self._array.copy()
            return self._array.__dlpack__(stream=stream, **kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU

    @staticmethod
    def from_dlpack(name: str, dlpack_tensor: Any) -> Tensor:
        """A Tensor viewing a DLPack capsule or any object with ``__dlpack__`` (a torch
        CPU tensor, a numpy array), without a copy. GPU memory is refused for now."""
        if not isinstance(name, str) or name == "":
            raise TritonModelException("Tensor name cannot be an empty string.")
        if type(dlpack_tensor).__name__ == "PyCapsule":
            source: Any = _DLPackCapsule(dlpack_tensor)
        elif hasattr(dlpack_tensor, "__dlpack__") and hasattr(dlpack_tensor, "__dlpack_device__"):
            source = dlpack_tensor
            device_type = dlpack_tensor.__dlpack_device__()[0]
            if device_type not in (1, 3):  # kDLCPU, kDLCUDAHost
                raise _not_supported(
                    f"Tensor.from_dlpack on device type {device_type} (GPU memory)"
                )
        else:
            raise TritonModelException(
                "Provided tensor is not supported. Tensor must be a DLPack capsule or have "
                "`__dlpack__` and `__dlpack_device__` attributes"
            )
        try:
            array = np.from_dlpack(source)
        except (BufferError, TypeError, RuntimeError, ValueError) as exc:
            raise TritonModelException(f"Tensor.from_dlpack failed for '{name}': {exc}") from exc
        return Tensor(name, array)

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, dtype={self._array.dtype}, shape={self.shape()})"


def _check_tensors(tensors: Any, what: str) -> list[Tensor]:
    if not isinstance(tensors, (list, tuple)):
        raise TritonModelException(f'"{what}" must be a list.')
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f'"{what}" must hold pb_utils.Tensor objects, found {type(t)}')
    return list(tensors)


# ---------------------------------------------------------------------------------------
# Requests and responses


class PreferredMemory:
    """Where a BLS caller would like outputs placed (kept for API compatibility)."""

    def __init__(self, preferred_memory_type: int, preferred_device_id: int = 0) -> None:
        self.preferred_memory_type = preferred_memory_type
        self.preferred_device_id = preferred_device_id


class InferenceTrace:
    """Trace handle of a request; Despina does not trace Python models yet."""

    def get_context(self) -> str | None:
        return None


_COMPACT = (",", ":")  # Triton's JSON is compact: {"k":"v"}


class InferenceRequest:
    """A request as the model sees it in ``execute(requests)``.

    The backend builds these around the batch it was given; a model may also construct
    one (Triton's BLS signature is accepted) but ``exec``/``async_exec`` are not
    supported yet. ``parameters()`` returns the request parameters as a JSON string,
    as Triton does.
    """

    __slots__ = (
        "_request_id",
        "_correlation_id",
        "_inputs",
        "_requested",
        "_default_outputs",
        "_model_name",
        "_model_version",
        "_flags",
        "_timeout",
        "_parameters",
        "_parameters_json",
        "_sender",  # a decoupled model's request only
    )

    def __init__(
        self,
        request_id: str = "",
        correlation_id: int | str = 0,
        inputs: Sequence[Tensor] | None = None,
        requested_output_names: Iterable[str] | None = None,
        model_name: str = "",
        model_version: int = -1,
        flags: int = 0,
        timeout: int = 0,
        preferred_memory: PreferredMemory | None = None,
        trace: InferenceTrace | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(correlation_id, (int, str)):
            raise TritonModelException("Correlation ID must be integer or string")
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._inputs = _check_tensors(list(inputs or []), "inputs")
        self._requested = list(requested_output_names or [])
        self._default_outputs: Sequence[str] = ()
        self._model_name = model_name
        self._model_version = model_version
        self._flags = flags
        self._timeout = timeout
        if parameters is not None and not isinstance(parameters, dict):
            raise TritonModelException("Request parameters must be a dict")
        self._parameters = parameters or {}
        self._parameters_json: str | None = None

    @classmethod
    def _from_backend(
        cls,
        request_id: str,
        inputs: list[Tensor],
        requested_outputs: list[str],
        default_outputs: Sequence[str],
        parameters: dict[str, Any],
        correlation_id: int | str,
        flags: int,
        timeout: int,
    ) -> InferenceRequest:
        """Backend fast path: no validation, parameters serialized only if asked for."""
        request = cls.__new__(cls)
        request._request_id = request_id
        request._correlation_id = correlation_id
        request._inputs = inputs
        request._requested = requested_outputs
        request._default_outputs = default_outputs
        request._model_name = ""
        request._model_version = -1
        request._flags = flags
        request._timeout = timeout
        request._parameters = parameters
        request._parameters_json = None
        return request

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def requested_output_names(self) -> set[str]:
        """Outputs the client asked for; every output of the model when it named none."""
        return set(self._requested or self._default_outputs)

    def flags(self) -> int:
        return self._flags

    def set_flags(self, flags: int) -> None:
        self._flags = flags

    def timeout(self) -> int:
        """The request's timeout in microseconds, 0 when none."""
        return self._timeout

    def parameters(self) -> str:
        if self._parameters_json is None:
            self._parameters_json = json.dumps(self._parameters, separators=_COMPACT)
        return self._parameters_json

    def trace(self) -> InferenceTrace:
        return InferenceTrace()

    def is_cancelled(self) -> bool:
        sender = getattr(self, "_sender", None)
        return sender is not None and sender.cancelled

    def get_response_sender(self) -> InferenceResponseSender:
        """The request's response sender (a decoupled model's requests only)."""
        sender = getattr(self, "_sender", None)
        if sender is None:
            raise TritonModelException(
                "Unable to get the response sender: the model does not use the decoupled "
                "transaction policy"
            )
        return sender

    def set_release_flags(self, flags: int) -> None:
        raise _not_supported("InferenceRequest.set_release_flags (request rescheduling)")

    def exec(self, decoupled: bool = False) -> Any:
        raise _not_supported("InferenceRequest.exec (business logic scripting)")

    def async_exec(self, decoupled: bool = False) -> Any:
        raise _not_supported("InferenceRequest.async_exec (business logic scripting)")

    def __repr__(self) -> str:
        names = [t.name() for t in self._inputs]
        return f"InferenceRequest(request_id={self._request_id!r}, inputs={names})"


class InferenceResponse:
    """The response to one request: output tensors, or an error (outputs then ignored)."""

    __slots__ = ("_output_tensors", "_error", "_parameters")

    def __init__(
        self,
        output_tensors: Sequence[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        if error is not None and not isinstance(error, TritonError):
            raise TypeError(f'"error" must be a pb_utils.TritonError or None, found {type(error)}')
        self._output_tensors = _check_tensors(
            [] if output_tensors is None else output_tensors, "output_tensors"
        )
        self._error = error
        self._parameters = parameters or {}

    def output_tensors(self) -> list[Tensor]:
        return self._output_tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return json.dumps(self._parameters, separators=_COMPACT)


class InferenceResponseSender:
    """A decoupled model's way to answer one request: zero or more responses, then the
    ``TRITONSERVER_RESPONSE_COMPLETE_FINAL`` flag (with a last response or alone), from
    ``execute`` or from any thread after it returned. Got from
    ``request.get_response_sender()``; the backend makes them."""

    __slots__ = ("_instance", "_request", "_infer", "_closed", "_lock", "cancelled")
    _instance: Any  # the PythonModelInstance (backend.py) that sends
    _request: Any
    _infer: Any
    _closed: bool
    _lock: threading.Lock
    cancelled: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TritonModelException(
            "InferenceResponseSender is made by the backend: use request.get_response_sender()"
        )

    @classmethod
    def _for(cls, instance: Any, request: Any, infer: Any) -> InferenceResponseSender:
        sender = cls.__new__(cls)
        sender._instance = instance
        sender._request = request
        sender._infer = infer
        sender._closed = False
        sender._lock = threading.Lock()
        sender.cancelled = False  # the client went away (set on the host's loop)
        return sender

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        """Send ``response`` (None only with the FINAL flag: the end, no response).
        Raises TritonModelException after the FINAL flag was sent, for another flag, or
        for something that is no InferenceResponse."""
        if flags not in (0, TRITONSERVER_RESPONSE_COMPLETE_FINAL):
            raise TritonModelException(f"Unsupported response flags: {flags}")
        final = flags == TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if response is None:
            if not final:
                raise TritonModelException(
                    "Inference Response object is needed when the flag is not "
                    "TRITONSERVER_RESPONSE_COMPLETE_FINAL"
                )
        elif not isinstance(response, InferenceResponse):
            raise TritonModelException(
                f"Expected an 'InferenceResponse' object to send, found type '{type(response)}'"
            )
        with self._lock:  # senders on several threads: one order, one final
            if self._closed:
                raise TritonModelException(
                    "Unable to send response. Response sender has been closed."
                )
            self._closed = final
            self._instance._send(self._request, self._infer, response, final)

    def is_cancelled(self) -> bool:
        """Whether the client went away (its stream closed): further responses are
        dropped; the model may stop early, and still sends its FINAL flag."""
        return self.cancelled


# ---------------------------------------------------------------------------------------
# Lookups


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    for properties in model_config.get("input", ()):
        if properties["name"] == name:
            return properties
    return None


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    for properties in model_config.get("output", ()):
        if properties["name"] == name:
            return properties
    return None


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    policy = model_config.get("model_transaction_policy")
    return bool(policy and policy.get("decoupled", False))


# ---------------------------------------------------------------------------------------
# Logging

_LOGGER = logging.getLogger("despina.python_model")


class LogLevel(enum.IntEnum):
    INFO = 0
    WARNING = 1
    ERROR = 2
    VERBOSE = 3


_TO_LOGGING: dict[int, int] = {
    LogLevel.INFO: logging.INFO,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
    LogLevel.VERBOSE: logging.DEBUG,
}


class Logger:
    """Triton's ``pb_utils.Logger``: writes to the Python logger ``despina.python_model``
    with the caller's file and line (VERBOSE is DEBUG)."""

    LogLevel = LogLevel
    INFO = LogLevel.INFO
    WARNING = LogLevel.WARNING
    ERROR = LogLevel.ERROR
    VERBOSE = LogLevel.VERBOSE

    @staticmethod
    def log(message: str, level: int = LogLevel.INFO) -> None:
        _LOGGER.log(_TO_LOGGING.get(level, logging.INFO), message, stacklevel=2)

    @staticmethod
    def log_info(message: str) -> None:
        _LOGGER.info(message, stacklevel=2)

    @staticmethod
    def log_warn(message: str) -> None:
        _LOGGER.warning(message, stacklevel=2)

    @staticmethod
    def log_error(message: str) -> None:
        _LOGGER.error(message, stacklevel=2)

    @staticmethod
    def log_verbose(message: str) -> None:
        _LOGGER.debug(message, stacklevel=2)


# ---------------------------------------------------------------------------------------
# Later features: present so models import, clear when used.


class ModelConfig:
    """The auto-complete helper a model's ``auto_complete_config(auto_complete_model_config)``
    staticmethod receives and returns (Triton's API): the model's config in Triton's JSON
    form, which the methods below extend. Raises ``ValueError`` where Triton's does (a
    tensor without name/data_type/dims, one that contradicts the config)."""

    def __init__(self, model_config: dict | str) -> None:
        self._model_config = (
            json.loads(model_config) if isinstance(model_config, str) else model_config
        )

    def as_dict(self) -> dict:
        return self._model_config

    def set_max_batch_size(self, max_batch_size: int) -> None:
        config = self._model_config
        current = int(config.get("max_batch_size", 0))
        if current not in (0, max_batch_size):
            raise ValueError(
                f"configuration specified max_batch_size {current}, but in "
                f"auto-complete-config function for model '{config.get('name')}' specified "
                f"max_batch_size {max_batch_size}"
            )
        config["max_batch_size"] = int(max_batch_size)

    def set_dynamic_batching(self) -> None:
        config = self._model_config
        if config.get("sequence_batching"):
            raise ValueError(
                f"configuration for model '{config.get('name')}' specified "
                "sequence_batching, cannot change to dynamic batching"
            )
        config.setdefault("dynamic_batching", {})

    def set_model_transaction_policy(self, transaction_policy_dict: dict) -> None:
        for key in transaction_policy_dict:
            if key != "decoupled":
                raise ValueError(
                    f"model transaction property '{key}' is not supported (only 'decoupled')"
                )
        policy = self._model_config.setdefault("model_transaction_policy", {})
        policy["decoupled"] = bool(transaction_policy_dict.get("decoupled", False))

    def add_input(self, input: dict) -> None:
        self._add("input", input)

    def add_output(self, output: dict) -> None:
        self._add("output", output)

    def _add(self, kind: str, tensor: dict) -> None:
        model = self._model_config.get("name")
        if not isinstance(tensor, dict):
            raise ValueError(f"{kind} for model '{model}' must be a dict, got {type(tensor)}")
        for key in ("name", "data_type", "dims"):
            if key not in tensor:
                raise ValueError(
                    f"{kind} in auto-complete-config function for model "
                    f"'{model}' is missing '{key}' property."
                )
        allowed = (
            {"name", "data_type", "dims", "optional"}
            if kind == "input"
            else {"name", "data_type", "dims"}
        )
        for key in tensor:
            if key not in allowed:
                raise ValueError(
                    f"{kind} '{tensor['name']}' in auto-complete-config function for model "
                    f"'{model}' has an unknown property '{key}'"
                )
        entries = self._model_config.setdefault(kind, [])
        for entry in entries:
            if entry.get("name") != tensor["name"]:
                continue
            if entry.get("data_type", "TYPE_INVALID") not in ("TYPE_INVALID", tensor["data_type"]):
                raise ValueError(
                    f"unable to load model '{model}', configuration expects datatype "
                    f"{entry['data_type']} for {kind} '{tensor['name']}', model provides "
                    f"{tensor['data_type']}"
                )
            if entry.get("dims") and [int(d) for d in entry["dims"]] != list(tensor["dims"]):
                raise ValueError(
                    f"model '{model}', tensor '{tensor['name']}': the model expects dims "
                    f"{list(tensor['dims'])} but the model configuration specifies dims "
                    f"{entry['dims']}"
                )
            entry.setdefault("data_type", tensor["data_type"])
            entry["dims"] = list(tensor["dims"])
            return
        entries.append({k: (list(v) if k == "dims" else v) for k, v in tensor.items()})


class MetricFamily:
    """Custom metrics; not supported yet."""

    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise _not_supported("pb_utils.MetricFamily (custom metrics)")


def load_model(model_name: str, config: str = "", files: dict | None = None) -> None:
    raise _not_supported("pb_utils.load_model (model loading API)")


def unload_model(model_name: str, unload_dependents: bool = False) -> None:
    raise _not_supported("pb_utils.unload_model (model loading API)")


def is_model_ready(model_name: str, model_version: str = "") -> bool:
    raise _not_supported("pb_utils.is_model_ready (model loading API)")
