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


# --- logging and trace settings ---------------------------------------------------------


def log_settings_json(record: c.LogSettings) -> bytes:
    return orjson.dumps(record.settings)


def log_settings_pb(record: c.LogSettings) -> pb.LogSettingsResponse:
    response = pb.LogSettingsResponse()
    for name, value in record.settings.items():
        slot = response.settings[name]
        if type(value) is bool:
            slot.bool_param = value
        elif type(value) is int:
            slot.uint32_param = value
        else:
            slot.string_param = str(value)
    return response


def log_settings_update(request: pb.LogSettingsRequest) -> bytes:
    """A gRPC ``LogSettingsRequest`` as the HTTP JSON update the scheduler reads."""
    update: dict[str, bool | int | str] = {}
    for name, value in request.settings.items():
        kind = value.WhichOneof("parameter_choice")
        update[name] = getattr(value, kind) if kind is not None else ""
    return orjson.dumps(update)


def trace_settings_json(record: c.TraceSettings) -> bytes:
    """Triton's form: ``trace_level`` an array, every other setting one string."""
    return orjson.dumps(
        {k: v if k == "trace_level" else (v[0] if v else "") for k, v in record.settings.items()}
    )


def trace_settings_pb(record: c.TraceSettings) -> pb.TraceSettingResponse:
    response = pb.TraceSettingResponse()
    for name, value in record.settings.items():
        response.settings[name].value.extend(value)
    return response


def trace_settings_update(request: pb.TraceSettingRequest) -> bytes:
    """A gRPC ``TraceSettingRequest`` as the HTTP JSON update: a setting with no value
    clears it (null), as Triton reads it."""
    update: dict[str, list[str] | None] = {
        name: list(value.value) or None for name, value in request.settings.items()
    }
    return orjson.dumps(update)


# --- statistics -------------------------------------------------------------------------


def _duration(count: int, ns: int) -> dict:
    return {"count": count, "ns": ns}


def _inference_stats(s: c.ModelStatistics) -> dict:
    fail_count = sum(entry[0] for entry in s.fail.values())
    fail_ns = sum(entry[1] for entry in s.fail.values())
    return {
        "success": _duration(s.success_count, s.success_ns),
        "fail": _duration(fail_count, fail_ns),
        "queue": _duration(s.queue_count, s.queue_ns),
        "compute_input": _duration(s.input_count, s.input_ns),
        "compute_infer": _duration(s.infer_count, s.infer_ns),
        "compute_output": _duration(s.output_count, s.output_ns),
        "cache_hit": _duration(0, 0),  # no response cache yet
        "cache_miss": _duration(0, 0),
    }


def _batch_stats(s: c.ModelStatistics) -> list[dict]:
    return [
        {
            "batch_size": size,
            "compute_input": _duration(count, input_ns),
            "compute_infer": _duration(count, infer_ns),
            "compute_output": _duration(count, output_ns),
        }
        for size, (count, input_ns, infer_ns, output_ns) in sorted(s.batch.items())
    ]


def _response_stats(s: c.ModelStatistics) -> dict[str, dict]:
    """Triton's ``response_stats`` of a decoupled model: per response index, its
    success / fail / empty_response / cancel counts and durations (each response's time
    since the one before it, as its frontend saw them); compute_infer is that of every
    response that carried outputs or an error, compute_output is not measured apart (0 ns)."""
    out = {}
    for index, (ok, ok_ns, fail, fail_ns, empty, empty_ns, cancel, cancel_ns) in sorted(
        s.responses.items(), key=lambda item: int(item[0])
    ):
        out[index] = {
            "compute_infer": _duration(ok + fail, ok_ns + fail_ns),
            "compute_output": _duration(ok + fail, 0),
            "success": _duration(ok, ok_ns),
            "fail": _duration(fail, fail_ns),
            "empty_response": _duration(empty, empty_ns),
            "cancel": _duration(cancel, cancel_ns),
        }
    return out


def statistics_json(record: c.Statistics) -> bytes:
    """Triton's statistics extension JSON: ``model_stats``, one entry per model version
    (``response_stats``: decoupled models' only, empty for the others)."""
    return orjson.dumps(
        {
            "model_stats": [
                {
                    "name": s.name,
                    "version": s.version,
                    "last_inference": s.last_inference,
                    "inference_count": s.inference_count,
                    "execution_count": s.execution_count,
                    "inference_stats": _inference_stats(s),
                    "response_stats": _response_stats(s) if s.responses else {},
                    "batch_stats": _batch_stats(s),
                    "memory_usage": [],
                }
                for s in record.models
            ]
        }
    )


def statistics_pb(record: c.Statistics) -> pb.ModelStatisticsResponse:
    response = pb.ModelStatisticsResponse()
    for s in record.models:
        entry = response.model_stats.add(
            name=s.name,
            version=s.version,
            last_inference=s.last_inference,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
        )
        for key, value in _inference_stats(s).items():
            duration = getattr(entry.inference_stats, key)
            duration.count, duration.ns = value["count"], value["ns"]
        if s.responses:
            for index, kinds in _response_stats(s).items():
                response_stats = entry.response_stats[index]
                for key, value in kinds.items():
                    duration = getattr(response_stats, key)
                    duration.count, duration.ns = value["count"], value["ns"]
        for batch in _batch_stats(s):
            stats = entry.batch_stats.add(batch_size=batch["batch_size"])
            for key in ("compute_input", "compute_infer", "compute_output"):
                duration = getattr(stats, key)
                duration.count, duration.ns = batch[key]["count"], batch[key]["ns"]
    return response
