"""The control plane's typed records (common/control.py) encoded for each protocol: one
function per record per protocol, ``*_json`` to Triton's HTTP JSON bytes and ``*_pb`` to
tritonclient's gRPC protobuf (``service_pb2``). Pure functions, safe from any task;
off the request path. The HTTP bytes are the ones Triton's HTTP server writes (keys in
its order, compact), and tests compare them byte for byte."""

from __future__ import annotations

import orjson

from despina.common import control as c
from despina.common.protos import service_pb2 as pb

# --- server metadata --------------------------------------------------------------------


def server_metadata_json(record: c.ServerMetadata) -> bytes:
    return orjson.dumps(
        {"name": record.name, "version": record.version, "extensions": record.extensions}
    )


def server_metadata_pb(record: c.ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(
        name=record.name, version=record.version, extensions=record.extensions
    )


# --- model metadata ---------------------------------------------------------------------


def _tensors_json(tensors: list[c.TensorMetadata]) -> list[dict]:
    return [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in tensors]


def model_metadata_json(record: c.ModelMetadata) -> bytes:
    return orjson.dumps(
        {
            "name": record.name,
            "versions": record.versions,
            "platform": record.platform,
            "inputs": _tensors_json(record.inputs),
            "outputs": _tensors_json(record.outputs),
        }
    )


def _tensors_pb(tensors: list[c.TensorMetadata]) -> list:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return [tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors]


def model_metadata_pb(record: c.ModelMetadata) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=record.name,
        versions=record.versions,
        platform=record.platform,
        inputs=_tensors_pb(record.inputs),
        outputs=_tensors_pb(record.outputs),
    )


# --- model config -----------------------------------------------------------------------


def model_config_json(record: c.ModelConfig) -> bytes:
    return record.json


def model_config_pb(record: c.ModelConfig) -> pb.ModelConfigResponse:
    response = pb.ModelConfigResponse()
    response.config.MergeFromString(record.proto)
    return response


# --- repository index -------------------------------------------------------------------


def repository_index_json(record: c.RepositoryIndex) -> bytes:
    """Every entry; a model with no usable config has no ``version`` key (as Triton)."""
    return orjson.dumps(
        [
            {"name": e.name, "state": e.state, "reason": e.reason}
            if e.version is None
            else {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
            for e in record.models
        ]
    )


def repository_index_pb(record: c.RepositoryIndex, ready_only: bool) -> pb.RepositoryIndexResponse:
    """``ready_only`` keeps the READY model versions only (the gRPC request's ``ready``)."""
    index = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(
        models=[
            index(name=e.name, version=e.version or "", state=e.state, reason=e.reason)
            for e in record.models
            if not ready_only or e.state == "READY"
        ]
    )


# --- shared-memory status ---------------------------------------------------------------


def shm_status_json(record: c.ShmStatus) -> bytes:
    return orjson.dumps(
        [
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in record.regions
        ]
    )


def shm_status_pb(record: c.ShmStatus) -> pb.SystemSharedMemoryStatusResponse:
    response = pb.SystemSharedMemoryStatusResponse()
    for r in record.regions:
        status = response.regions[r.name]
        status.name, status.key, status.offset, status.byte_size = (
            r.name,
            r.key,
            r.offset,
            r.byte_size,
        )
    return response


def cuda_shm_status_json(record: c.CudaShmStatus) -> bytes:
    return orjson.dumps(
        [
            {"name": r.name, "device_id": r.device_id, "byte_size": r.byte_size}
            for r in record.regions
        ]
    )


def cuda_shm_status_pb(record: c.CudaShmStatus) -> pb.CudaSharedMemoryStatusResponse:
    response = pb.CudaSharedMemoryStatusResponse()
    for r in record.regions:
        status = response.regions[r.name]
        status.name, status.device_id, status.byte_size = r.name, r.device_id, r.byte_size
    return response


def shm_status_any_json(record: c.ShmStatus | c.CudaShmStatus) -> bytes:
    """Either status record, by its kind (one HTTP handler serves both)."""
    if isinstance(record, c.CudaShmStatus):
        return cuda_shm_status_json(record)
    return shm_status_json(record)


def shm_status_any_pb(
    record: c.ShmStatus | c.CudaShmStatus,
) -> pb.SystemSharedMemoryStatusResponse | pb.CudaSharedMemoryStatusResponse:
    """Either status record, by its kind, to its gRPC response."""
    if isinstance(record, c.CudaShmStatus):
        return cuda_shm_status_pb(record)
    return shm_status_pb(record)
