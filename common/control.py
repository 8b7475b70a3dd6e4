"""The control plane's answers as typed records: what the scheduler returns in a
``QueryReply`` (and the server metadata a frontend answers itself), protocol-neutral.
Each frontend protocol encodes them (services/frontend/control.py: Triton's HTTP JSON,
tritonclient's gRPC protobuf); nothing here knows HTTP or gRPC.

A query with nothing to return (``server_ready``, ``model_ready``, the shared-memory
register and unregister) is answered with no record: no error means yes / done.

A model's configuration travels twice encoded, as ``ModelConfig.json`` (Triton's JSON
form, what ``/config`` returns byte for byte) and ``ModelConfig.proto`` (the serialized
``model_config_pb2.ModelConfig``, what gRPC's ``ModelConfigResponse.config`` holds): both
are made once when the model's config is read, so neither protocol converts per query,
and a record of the config's hundred-odd fields here would only copy the proto.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from despina.common.errors import internal


class TensorMetadata(msgspec.Struct, array_like=True):
    name: str
    datatype: str
    shape: list[int]  # -1 for the batch dimension and variable dims


class ServerMetadata(msgspec.Struct, tag="server_metadata", array_like=True):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(msgspec.Struct, tag="model_metadata", array_like=True):
    name: str
    versions: list[str]  # the ready ones
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelConfig(msgspec.Struct, tag="model_config", array_like=True):
    json: bytes  # Triton's JSON of the config (64-bit integers as numbers)
    proto: bytes  # model_config_pb2.ModelConfig, serialized


class IndexEntry(msgspec.Struct, array_like=True):
    """One model version in the repository index; ``version`` None for a model whose
    config could not be used (it has no versions)."""

    name: str
    version: str | None
    state: str  # READY, LOADING, UNAVAILABLE...
    reason: str


class RepositoryIndex(msgspec.Struct, tag="repository_index", array_like=True):
    models: list[IndexEntry]


class ShmRegionStatus(msgspec.Struct, array_like=True):
    name: str
    key: str
    offset: int
    byte_size: int


class ShmStatus(msgspec.Struct, tag="shm_status", array_like=True):
    """System shared-memory regions, in registration order."""

    regions: list[ShmRegionStatus]


class CudaShmRegionStatus(msgspec.Struct, array_like=True):
    name: str
    device_id: int
    byte_size: int


class CudaShmStatus(msgspec.Struct, tag="cuda_shm_status", array_like=True):
    regions: list[CudaShmRegionStatus]


_R = TypeVar("_R")

# What a ``QueryReply`` may carry.
Record = ModelMetadata | ModelConfig | RepositoryIndex | ShmStatus | CudaShmStatus


def expect(record: object, kind: type[_R]) -> _R:
    """``record`` as the ``kind`` a query asked for; INTERNAL if the scheduler answered
    another (a peer of another version)."""
    if not isinstance(record, kind):
        raise internal(f"the scheduler answered {type(record).__name__}, not {kind.__name__}")
    return record
