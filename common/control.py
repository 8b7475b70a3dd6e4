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


class LogSettings(msgspec.Struct, tag="log_settings", array_like=True):
    """The logging extension's settings (common/logs.py: log_file, log_info,
    log_warning, log_error, log_verbose_level, log_format)."""

    settings: dict[str, bool | int | str]


class TraceSettings(msgspec.Struct, tag="trace_settings", array_like=True):
    """The trace extension's settings of a model or the global ones, as Triton answers
    them: each a list of strings (trace_level's may hold several, the others one)."""

    settings: dict[str, list[str]]


class ModelStatistics(msgspec.Struct, array_like=True):
    """One model version's counts and durations (ns), Triton's statistics and metrics in
    one record. It travels twice: as a delta a frontend or backend host accumulated for
    at most ``common/stats.FLUSH_S`` (``messages.StatsReport``: only what that process
    saw, see common/stats.py for who counts what), and as the scheduler's merged totals
    (``Statistics``). Mutable on purpose: a reporter adds into its delta in place."""

    name: str
    version: str
    success_count: int = 0  # requests answered without error (frontends)
    success_ns: int = 0  # their end-to-end duration, decode to reply
    fail: dict[str, list[int]] = {}  # reason (Triton's) -> [count, ns] (frontends)
    queue_count: int = 0  # requests executed (backend hosts, from here on)
    queue_ns: int = 0  # received by the host (or queued in its batcher) to batch start
    input_count: int = 0
    input_ns: int = 0  # reading the inputs, the batch's time counted per request
    infer_count: int = 0
    infer_ns: int = 0  # the model's execute, the batch's time counted per request
    output_count: int = 0
    output_ns: int = 0  # encoding and queueing the replies, counted per request
    inference_count: int = 0  # inferences (the batch dimension summed) executed
    execution_count: int = 0  # executions (batches)
    last_inference: int = 0  # ms since the epoch of the last execution's end
    batch: dict[int, list[int]] = {}  # batch size -> [count, input_ns, infer_ns, output_ns]
    # Per-stage histograms: stage -> bucket counts (common/stats.BOUNDS_NS, then +Inf),
    # then the sum of the observations in ns.
    stages: dict[str, list[int]] = {}
    # A gauge: requests waiting to run. In a backend host's answer to a StatsFlush, those
    # waiting in it; in the scheduler's totals, those it queues plus every host's last.
    pending: int = 0
    # Decoupled models' responses by index ("0", "1", ...; frontends): [success count,
    # ns, fail count, ns, empty_response count, ns, cancel count, ns] (common/stats.py).
    responses: dict[str, list[int]] = {}
    # A decoupled model's requests by the time to their first response: bucket counts
    # (``first_response_le``, then +Inf), then the sum in ns; empty until one is counted.
    # Kept by the scheduler, which bins the frontends' ``first_response_ns``.
    first_response: list[int] = []
    # A frontend's delta: each first response's time (ns), as counted (binned by the
    # scheduler, on the model's own buckets: a config's ``model_metrics`` may set them).
    first_response_ns: list[int] = []
    # The upper bounds (ms) of ``first_response``'s buckets (stats.first_response_bounds).
    first_response_le: list[float] = []


class Statistics(msgspec.Struct, tag="statistics", array_like=True):
    """The scheduler's totals for the model versions a statistics query asked for."""

    models: list[ModelStatistics]


_R = TypeVar("_R")

# What a ``QueryReply`` may carry.
Record = (
    ModelMetadata
    | ModelConfig
    | RepositoryIndex
    | ShmStatus
    | CudaShmStatus
    | LogSettings
    | TraceSettings
    | Statistics
)


def expect(record: object, kind: type[_R]) -> _R:
    """``record`` as the ``kind`` a query asked for; INTERNAL if the scheduler answered
    another (a peer of another version)."""
    if not isinstance(record, kind):
        raise internal(f"the scheduler answered {type(record).__name__}, not {kind.__name__}")
    return record
