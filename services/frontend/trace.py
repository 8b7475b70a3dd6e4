"""Triton's trace extension in a frontend: which requests are traced, their timestamps,
and the trace file.

The scheduler holds the settings (services/scheduler/settings_store.py) and sends them
whole (``messages.Settings.trace``): ``trace[""]`` the global ones, ``trace[model]`` the
fields a model sets, the others falling back to the global ones. A model whose
``trace_level`` is OFF (and every model when none is on) costs nothing: the data plane
starts calls through ``Tracer.start`` only while some level is on (``DataPlane``).

Sampling: every ``trace_rate``-th request of a model is traced (the 1st, the
rate+1-th...), until ``trace_count`` traces were taken (-1: no end); counted in each
frontend. A traced request records, on the wall clock in nanoseconds:
REQUEST_START (the frontend starts the call), QUEUE_START (its message leaves for the
scheduler or the backend host), REQUEST_END (its reply arrived); the one JSON record per
request that Triton writes: ``{"id", "model_name", "model_version", "timestamps":
[{"name", "ns"}, ...]}``.

The file: ``trace_file`` holds one JSON array, kept valid after every write; with
``log_frequency`` 0 each trace is added as it completes, with N > 0 every N traces go
to a new file ``trace_file.<k>`` (k = 0, 1, ... as Triton names them). Frontends that
share the file take an advisory lock (``fcntl.flock``) around each write. Trace ids
count from 1 in each frontend. Loop's thread only.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import time
from collections.abc import Callable

import orjson

log = logging.getLogger("despina.frontend")

_DEFAULTS = {
    "trace_level": ["OFF"],
    "trace_rate": ["1000"],
    "trace_count": ["-1"],
    "log_frequency": ["0"],
    "trace_file": [""],
}


class _ModelTrace:
    """One model's effective settings and its sampling state."""

    __slots__ = ("on", "rate", "remaining", "frequency", "file", "seen", "pending")

    def __init__(self, fields: dict[str, list[str]]) -> None:
        levels = fields["trace_level"]
        self.file = fields["trace_file"][0]
        self.on = any(level != "OFF" for level in levels) and bool(self.file)
        self.rate = max(1, int(fields["trace_rate"][0]))
        self.remaining = int(fields["trace_count"][0])
        self.frequency = int(fields["log_frequency"][0])
        self.seen = 0
        self.pending: list[dict] = []


class Tracer:
    """Samples requests and writes their traces, per the settings last received."""

    def __init__(self) -> None:
        self._settings: dict[str, dict[str, list[str]]] = {"": dict(_DEFAULTS)}
        self._models: dict[str, _ModelTrace] = {}
        self._ids = itertools.count(1)
        self.active = False

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

    def sample(self, model: str) -> dict | None:
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
        return {"id": next(self._ids), "model_name": model, "timestamps": []}

    def finish(self, model: str, record: dict, version: str) -> None:
        """The traced request is answered: file its record."""
        record["model_version"] = int(version) if version.isdigit() else -1
        record["timestamps"].append({"name": "REQUEST_END", "ns": time.time_ns()})
        state = self._model(model)
        state.pending.append(record)
        if state.frequency <= 0 or len(state.pending) >= state.frequency:
            self._write(state)

    def flush(self) -> None:
        """Write every trace not yet written (settings change, shutdown)."""
        for state in self._models.values():
            if state.pending:
                self._write(state)

    @staticmethod
    def _write(state: _ModelTrace) -> None:
        records, state.pending = state.pending, []
        try:
            if state.frequency > 0:
                _with_lock(state.file, lambda: _new_numbered(state.file, records))
            else:
                _with_lock(state.file, lambda: _extend(state.file, records))
        except OSError as exc:
            log.error("cannot write %d trace(s) to %s: %s", len(records), state.file, exc)


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
