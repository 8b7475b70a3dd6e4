"""Triton's trace extension in a frontend: which requests are traced, their timestamps
across the processes they pass, their tensors, and where traces go (the trace file, or
OpenTelemetry).

The scheduler holds the settings (services/scheduler/settings_store.py) and sends them
whole (``messages.Settings.trace``): ``trace[""]`` the global ones, ``trace[model]`` the
fields a model sets, the others falling back to the global ones. A model whose
``trace_level`` is OFF (and every model when none is on) costs nothing: the data plane
starts calls through ``Tracer.start`` only while some level is on (``DataPlane``).

Sampling: every ``trace_rate``-th request of a model is traced (the 1st, the
rate+1-th...), until ``trace_count`` traces were taken (-1: no end); counted in each
frontend. A traced request carries a list on the wire (``Infer.trace``) that the
scheduler and the backend host stamp (common/trace_stamps.py) and its reply brings
back; untraced requests carry None. Its timestamps, all ``time.time_ns()`` (one clock
for the processes of a machine), in order:

  HTTP_RECV_START        the request's first byte came (GRPC_WAITREAD_START: its
                         headers), stamped by the lean HTTP and h2 gRPC transports
                         for every request while tracing is on (``InferCall.proto``)
  HTTP_RECV_END          the request was read whole (GRPC_WAITREAD_END)
  REQUEST_START          this frontend starts the call (the request is decoded)
  QUEUE_START            the scheduler took it (scheduled routes), or the backend host
                         did (direct routes: the host's batcher is the queue)
  COMPUTE_START          the backend host launches the execution holding it
  COMPUTE_INPUT_END      the model's execute begins (inputs are views, already read)
  COMPUTE_OUTPUT_START   the model's execute returned
  COMPUTE_END            the host is about to encode the replies
  REQUEST_END            its reply reached this frontend
  HTTP_SEND_START        its answer begins to be encoded (GRPC_SEND_START); the record
                         waits for the transport's ``DataPlane.trace_sent``
  HTTP_SEND_END          its answer was written (GRPC_SEND_END)

``trace_level`` TENSORS adds the request's input tensors (activity TENSOR_QUEUE_INPUT,
as the frontend sent them) and output tensors (TENSOR_BACKEND_OUTPUT, as the reply
brought them), each ``{"name", "data", "shape", "dtype"}`` in Triton's text form.

The file (``trace_mode`` triton): ``trace_file`` holds one JSON array, kept valid after
every write: per traced request one record ``{"id", "model_name", "model_version",
"request_id", "timestamps": [{"name", "ns"}, ...]}``, then its tensor records ``{"id",
"activity", "tensor"}``. With ``log_frequency`` 0 each trace is added as it completes,
with N > 0 every N traces go to a new file ``trace_file.<k>`` (k = 0, 1, ... as Triton
names them). Frontends that share the file take an advisory lock (``fcntl.flock``)
around each write. Trace ids count from 1 in each frontend.

``trace_mode`` opentelemetry (``--trace-config mode=opentelemetry``): each trace is
exported as spans instead (services/frontend/otel.py), to the URL the frontend's own
``--trace-config opentelemetry,url=`` flags name (``otel_settings``). Loop's thread only.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import orjson

from despina.common import dtypes

if TYPE_CHECKING:
    from despina.services.frontend.inference import InferenceRequest, InferenceResult
    from despina.services.frontend.otel import OtelExport

log = logging.getLogger("despina.frontend")

_DEFAULTS = {
    "trace_level": ["OFF"],
    "trace_rate": ["1000"],
    "trace_count": ["-1"],
    "log_frequency": ["0"],
    "trace_file": [""],
    "trace_mode": ["triton"],
}


class _ModelTrace:
    """One model's effective settings and its sampling state."""

    __slots__ = (
        "on",
        "tensors",
        "otel",
        "rate",
        "remaining",
        "frequency",
        "file",
        "seen",
        "pending",
    )

    def __init__(self, fields: dict[str, list[str]]) -> None:
        levels = fields["trace_level"]
        self.file = fields["trace_file"][0]
        self.otel = fields.get("trace_mode", ["triton"]) == ["opentelemetry"]
        self.on = any(level != "OFF" for level in levels) and (self.otel or bool(self.file))
        self.tensors = "TENSORS" in levels and not self.otel  # Triton: not in OpenTelemetry
        self.rate = max(1, int(fields["trace_rate"][0]))
        self.remaining = int(fields["trace_count"][0])
        self.frequency = int(fields["log_frequency"][0])
        self.seen = 0
        self.pending: list[dict] = []


class Tracer:
    """Samples requests and writes (or exports) their traces, per the settings last
    received."""

    def __init__(self) -> None:
        self._settings: dict[str, dict[str, list[str]]] = {"": dict(_DEFAULTS)}
        self._models: dict[str, _ModelTrace] = {}
        self._ids = itertools.count(1)
        self.active = False
        # This frontend's --trace-config opentelemetry,<setting>=<value> settings
        # (services/observability_flags.otel_settings_of); the exporter starts at the
        # first trace to export.
        self.otel_settings: dict[str, list[str]] = {}
        self._otel: OtelExport | None = None

    def update(self, trace: dict[str, dict[str, list[str]]]) -> None:
        """Take the settings the scheduler sent (all of them); sampling starts over.
        Traces not yet written are written first."""
        self.flush()
        settings = {"": {**_DEFAULTS, **trace.get("", {})}}
        settings.update({k: v for k, v in trace.items() if k})
        self._settings = settings
        self._models = {}
        self.active = any(
            level != "OFF"
            for fields in settings.values()
            for level in fields.get("trace_level", [])
        )

    def _model(self, model: str) -> _ModelTrace:
        found = self._models.get(model)
        if found is None:
            fields = dict(self._settings[""])
            fields.update(self._settings.get(model, {}))
            found = self._models[model] = _ModelTrace(fields)
        return found

    def sample(self, model: str, request_id: str = "") -> dict | None:
        """A new trace record if this request of ``model`` is to be traced, else None."""
        state = self._model(model)
        if not state.on or state.remaining == 0:
            return None
        seen = state.seen
        state.seen = seen + 1
        if seen % state.rate:
            return None
        if state.remaining > 0:
            state.remaining -= 1
        record: dict = {"id": next(self._ids), "model_name": model, "timestamps": []}
        if request_id:
            record["request_id"] = request_id
        return record

    def start(self, record: dict, request: InferenceRequest, received: list | None = None) -> list:
        """The sampled request starts: its protocol's ``received`` stamps (HTTP_RECV_* or
        GRPC_WAITREAD_*, as (name, ns)), REQUEST_START, its input tensors (TENSORS), and
        the list the wire carries for the other processes' stamps."""
        timestamps = record["timestamps"]
        if received:
            timestamps.extend({"name": name, "ns": ns} for name, ns in received)
        timestamps.append({"name": "REQUEST_START", "ns": time.time_ns()})
        if self._model(request.model).tensors:
            record["tensors"] = [
                _tensor(record["id"], "TENSOR_QUEUE_INPUT", t.name, t.datatype, t.shape, t.data)
                for t in request.inputs
            ]
        return []

    def finish(
        self,
        model: str,
        record: dict,
        version: str,
        stamps: list | None = None,
        result: InferenceResult | None = None,
        file: bool = True,
    ) -> None:
        """The traced request is answered: add the other processes' ``stamps`` (from
        the reply) and REQUEST_END, its output tensors (TENSORS, from ``result``; read
        before the call closes), and file or export the record (unless not ``file``:
        then ``sent`` does, once the protocol sent the answer)."""
        record["model_version"] = int(version) if version.isdigit() else -1
        timestamps = record["timestamps"]
        if stamps:
            timestamps.extend({"name": name, "ns": ns} for name, ns in stamps)
        timestamps.append({"name": "REQUEST_END", "ns": time.time_ns()})
        state = self._model(model)
        if state.tensors and result is not None:
            record.setdefault("tensors", []).extend(
                _tensor(record["id"], "TENSOR_BACKEND_OUTPUT", t.name, t.datatype, t.shape, t.data)
                for t in result.outputs
            )
        if file:
            self._file(state, record)

    def sent(self, model: str, record: dict, protocol: str, start_ns: int) -> None:
        """A finished record's answer was sent: ``protocol``'s SEND_START at ``start_ns``
        (before its encoding) and SEND_END now, then the record is filed (``start_ns``
        0: nothing was sent, filed as it is)."""
        if start_ns:
            timestamps = record["timestamps"]
            timestamps.append({"name": f"{protocol}_SEND_START", "ns": start_ns})
            end = max(start_ns, time.time_ns())
            timestamps.append({"name": f"{protocol}_SEND_END", "ns": end})
        state = self._model(model)
        if state.otel or state.file:  # (settings changed meanwhile to none: dropped)
            self._file(state, record)

    def _file(self, state: _ModelTrace, record: dict) -> None:
        if state.otel:
            self._export(record)
            return
        state.pending.append(record)
        if state.frequency <= 0 or len(state.pending) >= state.frequency:
            self._write(state)

    def _export(self, record: dict) -> None:
        if self._otel is None:
            from despina.services.frontend.otel import OtelExport

            self._otel = OtelExport(self.otel_settings)
        self._otel.export(record)

    def flush(self) -> None:
        """Write every trace not yet written (settings change, shutdown)."""
        for state in self._models.values():
            if state.pending:
                self._write(state)

    def close(self) -> None:
        """Write what is pending and send the spans still batched (shutdown)."""
        self.flush()
        if self._otel is not None:
            self._otel.close()

    @staticmethod
    def _write(state: _ModelTrace) -> None:
        records: list[dict] = []
        for record in state.pending:
            tensors = record.pop("tensors", None)
            records.append(record)
            if tensors:
                records.extend(tensors)
        state.pending = []
        try:
            if state.frequency > 0:
                _with_lock(state.file, lambda: _new_numbered(state.file, records))
            else:
                _with_lock(state.file, lambda: _extend(state.file, records))
        except OSError as exc:
            log.error("cannot write %d trace(s) to %s: %s", len(records), state.file, exc)


def _tensor(
    trace_id: int,
    activity: str,
    name: str,
    datatype: str,
    shape: list[int],
    data: bytes | memoryview | None,
) -> dict:
    """One TENSORS record in Triton's form: data as comma-separated values ("" where
    the bytes are in a client's shared memory), shape as "d0,d1"."""
    return {
        "id": trace_id,
        "activity": activity,
        "tensor": {
            "name": name,
            "data": _values(datatype, shape, data),
            "shape": ",".join(map(str, shape)),
            "dtype": datatype,
        },
    }


def _values(datatype: str, shape: list[int], data: bytes | memoryview | None) -> str:
    if data is None:
        return ""
    try:
        if datatype == "BYTES":
            items = dtypes.deserialize_bytes(data, dtypes.element_count(shape))
            return ",".join(
                v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in items
            )
        array = np.frombuffer(data, dtype=dtypes.to_numpy(datatype))
    except (ValueError, TypeError, KeyError):
        return ""
    return ",".join(map(str, array.tolist()))


def _with_lock(path: str, write: Callable[[], None]) -> None:
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            write()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _extend(path: str, records: list[dict]) -> None:
    """Add ``records`` to the JSON array in ``path`` (written whole, then renamed in)."""
    try:
        with open(path, "rb") as f:
            existing = orjson.loads(f.read() or b"[]")
    except FileNotFoundError:
        existing = []
    except orjson.JSONDecodeError:
        existing = []  # not a trace file of ours: replaced
    existing.extend(records)
    _replace(path, orjson.dumps(existing, option=orjson.OPT_INDENT_2))


def _new_numbered(path: str, records: list[dict]) -> None:
    for k in itertools.count():
        if not os.path.exists(f"{path}.{k}"):
            _replace(f"{path}.{k}", orjson.dumps(records, option=orjson.OPT_INDENT_2))
            return


def _replace(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
