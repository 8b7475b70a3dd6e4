"""The protocol-neutral inference request and result that both frontends speak.

The HTTP and gRPC adapters decode into these records and encode from them; the data
plane (``dataplane.py``) and the scheduler client know nothing of either protocol.
Tensor bytes are raw little-endian element bytes; BYTES tensors hold their
length-prefixed serialized form (``common.dtypes.serialize_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from despina.common.errors import invalid_arg

ParamValue = bool | int | float | str


@dataclass(slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    # Raw bytes (None when the tensor lives in a client shared-memory region named in
    # ``parameters``: shared_memory_region / _offset / _byte_size).
    data: bytes | memoryview | None
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(slots=True)
class OutputRequest:
    name: str
    binary: bool = False  # HTTP binary_data; ignored by gRPC (always raw)
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceRequest:
    model: str
    version: str  # "" lets the version policy choose
    id: str
    inputs: list[InputTensor]
    # Empty means "every output of the model", each encoded with ``binary_output``.
    outputs: list[OutputRequest]
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    binary_output: bool = False  # HTTP "binary_data_output" request parameter
    # The shared-memory block the request body was read into, when it was large: input
    # data that are views of it travel as refs to it, with no copy. The scheduler client
    # takes it over (and frees it when the reply arrives).
    body_block: object | None = None
    # Shared by the requests a ``codec.HeaderMemo`` rebuilt from one header: the
    # signatures (by id) they were found to fit, so the rest skip that check.
    checked: dict[int, object] | None = None


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    # None when the output was written into the client's shared-memory region.
    data: bytes | memoryview | None


@dataclass(slots=True)
class InferenceResult:
    model: str
    version: str
    id: str
    outputs: list[OutputTensor]
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    # Shared-memory blocks the outputs' bytes live in, lent by a backend host: the
    # protocol adapter calls ``DataPlane.release`` once its response holds a copy.
    leases: list = field(default_factory=list)


_SEQUENCE_FLAGS = ("sequence_start", "sequence_end")
_UINT_REQUEST_PARAMS = ("priority", "timeout")


def check_request_parameter(
    key: str, value: ParamValue, show: Callable[[object], str], bool_spelling: str
) -> None:
    """Triton's checks on a request-level parameter, for both protocols: reserved
    ``triton_*`` keys, and the types of the sequence, priority and timeout parameters.
    ``show`` renders a value and ``bool_spelling`` names a boolean the way the caller's
    protocol writes them. Raises INVALID_ARG."""
    if key.startswith("triton_"):
        raise invalid_arg(
            f"parameter '{key}': keys starting with 'triton_' are reserved for Triton "
            "usage and should not be specified"
        )
    if key == "sequence_id":
        if not (type(value) is str or (type(value) is int and value >= 0)):
            raise invalid_arg(
                "unable to parse 'sequence_id': it must be a non-negative integer or a "
                f"string, got {show(value)}"
            )
    elif key in _SEQUENCE_FLAGS:
        if type(value) is not bool:
            raise invalid_arg(
                f"unable to parse '{key}': it must be {bool_spelling}, got {show(value)}"
            )
    elif key in _UINT_REQUEST_PARAMS:
        if type(value) is not int or value < 0:
            raise invalid_arg(
                f"unable to parse '{key}': it must be a non-negative integer, got {show(value)}"
            )


_SHM_UINT_PARAMS = ("shared_memory_offset", "shared_memory_byte_size")


def check_io_parameter(
    key: str,
    value: object,
    role: str,
    name: str,
    show: Callable[[object], str],
    string_spelling: str,
) -> None:
    """Triton's checks on a tensor's shared-memory parameters, for both protocols: the
    region a string, offset and byte size non-negative integers. ``role`` is "input" or
    "output"; ``show`` and ``string_spelling`` word the message as the protocol does.
    Raises INVALID_ARG."""
    if key == "shared_memory_region":
        if type(value) is not str:
            raise invalid_arg(
                f"unable to parse 'shared_memory_region' of {role} '{name}': it must be a "
                f"{string_spelling}, got {show(value)}"
            )
    elif key in _SHM_UINT_PARAMS:
        if type(value) is not int or value < 0:
            raise invalid_arg(
                f"unable to parse '{key}' of {role} '{name}': it must be a non-negative "
                f"integer, got {show(value)}"
            )
