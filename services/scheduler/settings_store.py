"""The logging and trace extensions' settings: the scheduler holds them, answers their
queries (``log_settings``, ``trace_setting``) and tells every frontend and backend host
(``messages.Settings``) when one joins and whenever they change.

Logging (common/logs.py): log_file, log_info, log_warning, log_error, log_verbose_level,
log_format. Trace (services/frontend/trace.py): trace_level, trace_rate, trace_count,
log_frequency, trace_file, trace_mode, global and per model: a model's settings hold only
the fields set for it, the others fall back to the global ones field by field, and an
update with a field ``null`` clears it (a model's falls back again; a global one returns
to its value at start). Both files are set at start only (``--log-file``,
``--trace-config triton,file=``): Triton refuses to move them over the network, and so
does Despina. Off the request path; the loop's thread only.

With a state folder (``--state-dir``; ``despina serve`` passes its runtime folder), what
clients changed is kept in ``<state-dir>/settings.json`` (``{"log": {...}, "trace":
{model: {...}}}``, "" the global trace settings; the files and the mode, fixed at start,
are not kept), written whole after every change and read at start, so a scheduler
started again after a crash tells every process the settings they had, not the flags'.
A file that cannot be read, or holds a setting the rules refuse, is logged and the
flags' settings stand.
"""

from __future__ import annotations

import logging
from pathlib import Path

import orjson

from despina.common import control as c
from despina.common import logs
from despina.common import messages as m
from despina.common.errors import Code, ServerError, invalid_arg
from despina.services.scheduler.model_state import write_state

log = logging.getLogger("despina.scheduler")

TRACE_LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
TRACE_DEFAULTS: dict[str, list[str]] = {
    "trace_level": ["OFF"],
    "trace_rate": ["1000"],
    "trace_count": ["-1"],
    "log_frequency": ["0"],
    "trace_file": [""],
    "trace_mode": ["triton"],
}
LOG_FILE_REFUSED = "log file location can not be updated through network protocol"
TRACE_FILE_REFUSED = "trace file location can not be updated through network protocol"
# The mode is set at start (--trace-config mode=): its exporter is set up then.
TRACE_MODE_REFUSED = "trace mode can not be updated through network protocol"
_LOG_BOOLS = ("log_info", "log_warning", "log_error")
FILE_NAME = "settings.json"
_START_ONLY = ("log_file", "trace_file", "trace_mode")  # not changed at run time: not kept


def check_trace_field(name: str, value: list[str]) -> list[str]:
    """``value`` of trace field ``name``, checked (as strings, Triton's form). Raises
    INVALID_ARG naming the field and what it takes."""
    if name == "trace_level":
        if not value or any(v not in TRACE_LEVELS for v in value):
            raise invalid_arg(
                f"unable to parse 'trace_level': expecting one or more of {', '.join(TRACE_LEVELS)}"
                f", got {value!r}"
            )
        return list(value)
    if name == "trace_mode":
        if value not in (["triton"], ["opentelemetry"]):
            raise invalid_arg(
                f"unable to parse 'trace_mode': expecting triton or opentelemetry, got {value!r}"
            )
        return value
    if name == "trace_file":
        if len(value) != 1:
            raise invalid_arg("unable to parse 'trace_file': expecting one string")
        return value
    lowest = {"trace_rate": 1, "trace_count": -1, "log_frequency": 0}.get(name)
    if lowest is None:
        raise invalid_arg(f"unknown trace setting '{name}'")
    try:
        if len(value) != 1:
            raise ValueError
        number = int(value[0])
    except (TypeError, ValueError):
        number = lowest - 1
    if number < lowest:
        raise invalid_arg(
            f"unable to parse '{name}': expecting an integer >= {lowest} (as a string), "
            f"got {value!r}"
        )
    return [str(number)]


def _trace_value(name: str, value: object) -> list[str] | None:
    """One JSON value of a trace update as a list of strings (None: clear the field)."""
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, str):
        return [value]
    raise invalid_arg(f"unable to parse '{name}': expecting a string or an array of strings")


class SettingsStore:
    """Owns the logging settings and the trace settings (global and per model)."""

    def __init__(
        self,
        log_settings: dict[str, bool | int | str] | None = None,
        trace_settings: dict[str, list[str]] | None = None,
        state_dir: str = "",
    ) -> None:
        """``log_settings`` / ``trace_settings``: what the flags set (the rest defaults);
        ``state_dir``: where changes are kept (""; none), read here first. Raises
        ServerError for a trace setting the flags got wrong."""
        self.log: dict[str, bool | int | str] = dict(logs.DEFAULTS)
        self.log.update(log_settings or {})
        self.trace_start = {k: list(v) for k, v in TRACE_DEFAULTS.items()}
        for name, value in (trace_settings or {}).items():
            self.trace_start[name] = check_trace_field(name, value)
        self.trace: dict[str, dict[str, list[str]]] = {"": dict(self.trace_start)}
        self.path = Path(state_dir) / FILE_NAME if state_dir else None
        if self.path is not None:
            self._restore(self.path)

    def _restore(self, path: Path) -> None:
        """The settings kept in ``path`` (none yet: nothing), through the same checks as
        a client's update; all of them or, refused or unreadable, none (logged)."""
        try:
            kept = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, orjson.JSONDecodeError) as exc:
            log.error("cannot read the kept settings %s (the flags' stand): %s", path, exc)
            return
        before = (dict(self.log), {k: dict(v) for k, v in self.trace.items()})
        try:
            if not isinstance(kept, dict):
                raise invalid_arg("not a JSON object")
            log_kept, trace_kept = kept.get("log", {}), kept.get("trace", {})
            if not isinstance(trace_kept, dict):
                raise invalid_arg("'trace' is not a JSON object")
            self._update_log(orjson.dumps(log_kept))
            for model, fields in sorted(trace_kept.items()):  # "" (global) first
                self._update_trace(model, orjson.dumps(fields))
        except ServerError as exc:
            self.log, self.trace = before
            logs.apply(self.log)
            log.error("the kept settings %s are refused (the flags' stand): %s", path, exc.message)

    def _keep(self) -> None:
        """Write what clients may change to the state folder's file, if there is one."""
        if self.path is None:
            return
        trace = {
            model: {k: v for k, v in fields.items() if k not in _START_ONLY}
            for model, fields in self.trace.items()
        }
        log_kept = {k: v for k, v in self.log.items() if k not in _START_ONLY}
        write_state(self.path, {"log": log_kept, "trace": trace}, "kept settings")

    def message(self) -> m.Settings:
        """What a frontend or backend host is told: every setting now."""
        return m.Settings(dict(self.log), {k: dict(v) for k, v in self.trace.items()})

    def answer(self, q: m.Query) -> tuple[m.QueryReply, bool]:
        """The reply to a ``log_settings`` / ``trace_setting`` query, and whether it
        changed the settings (then every process must be told). Never raises."""
        try:
            if q.kind == "log_settings":
                changed = self._update_log(q.body) if q.body else False
                record: c.Record = c.LogSettings(dict(self.log))
            else:
                changed = self._update_trace(q.model, q.body) if q.body else False
                record = c.TraceSettings(self.effective(q.model))
        except ServerError as exc:
            return m.QueryReply(q.qid, b"", m.Error(exc.code.value, exc.message)), False
        if changed:
            self._keep()
        return m.QueryReply(q.qid, record=record), changed

    def effective(self, model: str) -> dict[str, list[str]]:
        """A model's settings with the global ones filling what it does not set."""
        found = dict(self.trace[""])
        found.update(self.trace.get(model, {}))
        return found

    def _update_log(self, body: bytes) -> bool:
        try:
            update = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise invalid_arg(f"failed to parse the log settings JSON: {exc}") from None
        if not isinstance(update, dict):
            raise invalid_arg("the log settings must be a JSON object")
        new = dict(self.log)
        for name, value in update.items():
            if name == "log_file":
                raise ServerError(Code.UNSUPPORTED, LOG_FILE_REFUSED)
            if name in _LOG_BOOLS:
                if type(value) is not bool:
                    raise invalid_arg(f"expecting a boolean for '{name}', got {value!r}")
            elif name == "log_verbose_level":
                if type(value) is not int or value < 0:
                    raise invalid_arg(
                        f"expecting a non-negative integer for 'log_verbose_level', got {value!r}"
                    )
            elif name == "log_format":
                if value not in logs.FORMATS:
                    raise invalid_arg(
                        f"invalid value for 'log_format': expecting 'default' or 'ISO8601', "
                        f"got {value!r}"
                    )
            else:
                raise invalid_arg(f"unknown log setting '{name}'")
            new[name] = value
        changed = new != self.log
        self.log = new
        if changed:
            logs.apply(new)  # this process first: the line below is in the new settings
            log.info("log settings now %s", new)
        return changed

    def _update_trace(self, model: str, body: bytes) -> bool:
        try:
            update = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise invalid_arg(f"failed to parse the trace settings JSON: {exc}") from None
        if not isinstance(update, dict):
            raise invalid_arg("the trace settings must be a JSON object")
        fields = dict(self.trace.get(model, {}))
        for name, raw in update.items():
            if name == "trace_file":
                raise ServerError(Code.UNSUPPORTED, TRACE_FILE_REFUSED)
            if name == "trace_mode" and raw is not None:
                mode = check_trace_field(name, _trace_value(name, raw) or [])
                if mode != self.trace_start["trace_mode"]:
                    raise ServerError(Code.UNSUPPORTED, TRACE_MODE_REFUSED)
                continue
            if name not in TRACE_DEFAULTS or name == "trace_mode":
                raise invalid_arg(f"unknown trace setting '{name}'")
            value = _trace_value(name, raw)
            if value is None:
                if model:
                    fields.pop(name, None)
                else:
                    fields[name] = list(self.trace_start[name])
                continue
            fields[name] = check_trace_field(name, value)
        before = self.trace.get(model)
        if model and not fields:
            self.trace.pop(model, None)
        else:
            self.trace[model] = fields
        changed = self.trace.get(model) != before
        if changed:
            log.info("trace settings of %s now %s", model or "every model", fields)
        return changed
