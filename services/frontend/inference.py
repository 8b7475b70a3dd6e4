"""The protocol-neutral inference request and result that both frontends speak.

The HTTP and gRPC adapters decode into these records and encode from them; the data
plane (``dataplane.py``) and the scheduler client know nothing of either protocol.
Tensor bytes are raw little-endian element bytes; BYTES tensors hold their
length-prefixed serialized form (``common.dtypes.serialize_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
