"""Logging setup shared by every service, and the logging extension's settings applied
to it at run time.

One line per event, as Triton writes them, with the process's role and pid in every line:

  default:  ``I1203 16:24:21.123456 4242 frontend despina.frontend] message``
  ISO8601:  ``2026-12-03T16:24:21Z I 4242 frontend despina.frontend] message``

The settings (Triton's logging extension: ``log_file``, ``log_info``, ``log_warning``,
``log_error``, ``log_verbose_level``, ``log_format``) start from the tritonserver flags
(``despina serve`` passes them to every service) and change at run time when the
scheduler sends new ones (``messages.Settings``): ``apply`` takes them. A verbose level
above 0 lets DEBUG records through; ``log_info`` / ``log_warning`` / ``log_error``
false drop that severity. Every function here runs on the process's loop thread (or
before it starts); logging itself is thread-safe.
"""

from __future__ import annotations

import logging
import os
import sys
import time

FORMATS = ("default", "ISO8601")
# The settings a process starts with when no flag says otherwise (Triton's defaults).
DEFAULTS: dict[str, bool | int | str] = {
    "log_file": "",
    "log_info": True,
    "log_warning": True,
    "log_error": True,
    "log_verbose_level": 0,
    "log_format": "default",
}

_LETTER = {logging.DEBUG: "V", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E"}


class _Line(logging.Formatter):
    """Triton's line layouts, with the role (``frontend``, ``scheduler``, ``backend-...``)
    and logger name where Triton has its source file and line."""

    def __init__(self, role: str, iso: bool) -> None:
        super().__init__()
        self.role = role
        self.iso = iso

    def format(self, record: logging.LogRecord) -> str:
        letter = _LETTER.get(record.levelno, "E" if record.levelno > logging.ERROR else "V")
        if self.iso:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
            head = f"{stamp} {letter} {record.process} {self.role} {record.name}]"
        else:
            local = time.localtime(record.created)
            micros = int((record.created % 1) * 1_000_000)
            stamp = time.strftime("%m%d %H:%M:%S", local)
            head = f"{letter}{stamp}.{micros:06d} {record.process} {self.role} {record.name}]"
        line = f"{head} {record.getMessage()}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class _Severities(logging.Filter):
    """Drops the severities the settings turn off."""

    def __init__(self) -> None:
        super().__init__()
        self.info = self.warning = self.error = True

    def filter(self, record: logging.LogRecord) -> bool:
        level = record.levelno
        if level >= logging.ERROR:
            return self.error
        if level >= logging.WARNING:
            return self.warning
        if level >= logging.INFO:
            return self.info
        return True  # DEBUG: the logger's level already said whether verbose is on


_role = "despina"
_handler: logging.Handler | None = None
_severities = _Severities()
_current: dict[str, bool | int | str] = dict(DEFAULTS)


def setup_logging(
    service: str, verbose: int = 0, settings: dict[str, bool | int | str] | None = None
) -> None:
    """Install the process's one handler (stderr, or ``settings["log_file"]``) with
    Triton's layout, tagged ``service``; ``verbose`` is ``--log-verbose``, ``settings``
    the other logging flags (``settings_from_flags``). Raises OSError when the log file
    cannot be opened."""
    global _role
    _role = service
    start = dict(DEFAULTS)
    start.update(settings or {})
    start["log_verbose_level"] = max(int(start["log_verbose_level"]), verbose)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    global _handler
    _handler = None
    apply(start)


def _open_handler(path: str) -> logging.Handler:
    if not path:
        return logging.StreamHandler(sys.stderr)
    return logging.FileHandler(os.path.abspath(path), mode="a", encoding="utf-8")


def apply(settings: dict[str, bool | int | str]) -> None:
    """Take the logging settings ``settings`` names (the others stay) for this process
    now: severities, verbose level, format, and the file (opened in append mode; every
    process appends its own lines). Ignores unknown keys; a log file that cannot be
    opened keeps the current one and says so (recoverable)."""
    global _handler
    new = dict(_current)
    new.update({k: v for k, v in settings.items() if k in DEFAULTS})
    root = logging.getLogger()
    if _handler is None or new["log_file"] != _current["log_file"]:
        try:
            handler = _open_handler(str(new["log_file"] or ""))
        except OSError as exc:
            logging.getLogger("despina").error("cannot open log file %s: %s", new["log_file"], exc)
            new["log_file"] = _current["log_file"] if _handler is not None else ""
            handler = _handler or _open_handler("")
        if handler is not _handler:
            handler.addFilter(_severities)
            if _handler is not None:
                root.removeHandler(_handler)
                _handler.close()
            root.addHandler(handler)
            _handler = handler
    _handler.setFormatter(_Line(_role, new["log_format"] == "ISO8601"))
    _severities.info = bool(new["log_info"])
    _severities.warning = bool(new["log_warning"])
    _severities.error = bool(new["log_error"])
    root.setLevel(logging.DEBUG if int(new["log_verbose_level"]) > 0 else logging.INFO)
    _current.update(new)


def current() -> dict[str, bool | int | str]:
    """This process's logging settings now (a copy)."""
    return dict(_current)


def verbose() -> bool:
    """Whether verbose lines are on: for callers that would build a line's arguments."""
    return int(_current["log_verbose_level"]) > 0
