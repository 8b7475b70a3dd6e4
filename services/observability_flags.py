"""tritonserver's logging and trace flags: declared by ``despina serve`` and by each
service, forwarded from the first to the others by ``log_trace_argv``, and read into the
settings the logging extension (common/logs.py) and the trace extension
(services/scheduler/settings_store.py) start from.

  --log-info / --log-warning / --log-error <bool>, --log-format default|ISO8601,
  --log-file <path> (every process appends its lines to it)
  --trace-config [triton,]<setting>=<value> (repeatable; Triton's syntax: rate, level,
  count, mode globally; triton,file= and triton,log-frequency=), and the older spellings
  --trace-file, --trace-level (repeatable), --trace-rate, --trace-count,
  --trace-log-frequency.

``--trace-config mode=opentelemetry`` exports traces as OpenTelemetry spans
(services/frontend/otel.py) to ``--trace-config opentelemetry,url=...`` (with
``resource=``, ``bsp_max_queue_size=``, ``bsp_schedule_delay=``,
``bsp_max_export_batch_size=``). Without the optional packages (the ``otel`` extra) the
server refuses to start in that mode: a server that silently exported nothing would lose
what the operator asked for (fail closed).
"""

from __future__ import annotations

import argparse

from despina.common import logs
from despina.services.flags import parse_bool
from despina.services.frontend import otel


def add_log_trace_flags(group: argparse._ActionsContainer) -> None:
    """Declare the flags (not --log-verbose: every service declares that one already)."""
    for name in ("info", "warning", "error"):
        group.add_argument(
            f"--log-{name}",
            type=parse_bool,
            nargs="?",
            const=True,
            default=True,
            help=f"write {name} lines (default true)",
        )
    group.add_argument("--log-format", choices=logs.FORMATS, default="default")
    group.add_argument("--log-file", default="", help="append every process's log lines here")
    group.add_argument(
        "--trace-config",
        action="append",
        default=[],
        metavar="[MODE,]SETTING=VALUE",
        help="trace settings as Triton spells them: rate=N, level=TIMESTAMPS, count=N, "
        "triton,file=PATH, triton,log-frequency=N (repeatable)",
    )
    group.add_argument("--trace-file", default=None)
    group.add_argument("--trace-level", action="append", default=None)
    group.add_argument("--trace-rate", default=None)
    group.add_argument("--trace-count", default=None)
    group.add_argument("--trace-log-frequency", default=None)


def log_trace_argv(args: argparse.Namespace) -> list[str]:
    """The flags of a parsed command line, for the services ``serve`` starts."""
    argv = [
        f"--log-info={'true' if args.log_info else 'false'}",
        f"--log-warning={'true' if args.log_warning else 'false'}",
        f"--log-error={'true' if args.log_error else 'false'}",
        f"--log-format={args.log_format}",
        f"--log-file={args.log_file}",
        *[f"--trace-config={c}" for c in args.trace_config],
    ]
    for flag in ("trace_file", "trace_rate", "trace_count", "trace_log_frequency"):
        value = getattr(args, flag)
        if value is not None:
            argv.append(f"--{flag.replace('_', '-')}={value}")
    argv += [f"--trace-level={level}" for level in args.trace_level or []]
    return argv


def log_settings_of(args: argparse.Namespace) -> dict[str, bool | int | str]:
    """The logging extension's settings the flags give (common/logs.py)."""
    return {
        "log_file": args.log_file,
        "log_info": args.log_info,
        "log_warning": args.log_warning,
        "log_error": args.log_error,
        "log_verbose_level": args.log_verbose,
        "log_format": args.log_format,
    }


_TRITON_KEYS = {"file": "trace_file", "log-frequency": "log_frequency"}
_GLOBAL_KEYS = {"rate": "trace_rate", "level": "trace_level", "count": "trace_count"}


def trace_settings_of(args: argparse.Namespace) -> dict[str, list[str]]:
    """The trace settings the flags give, by the trace extension's names (values as
    strings; checked by the settings store). --trace-config wins over the older flags.
    Raises ValueError for a malformed --trace-config or the OpenTelemetry mode."""
    found: dict[str, list[str]] = {}
    if args.trace_file is not None:
        found["trace_file"] = [args.trace_file]
    if args.trace_level:
        found["trace_level"] = list(args.trace_level)
    for flag, name in (
        ("trace_rate", "trace_rate"),
        ("trace_count", "trace_count"),
        ("trace_log_frequency", "log_frequency"),
    ):
        if getattr(args, flag) is not None:
            found[name] = [getattr(args, flag)]
    levels: list[str] = []
    for item in args.trace_config:
        mode, _, setting = item.rpartition(",")
        key, eq, value = setting.partition("=")
        if not eq or not key:
            raise ValueError(f"--trace-config {item}: expecting [mode,]setting=value")
        if not mode and key == "mode":
            found["trace_mode"] = [_trace_mode(item, value)]
            continue
        if mode == "opentelemetry":
            if key not in otel.SETTINGS:
                raise ValueError(
                    f"--trace-config {item}: unknown OpenTelemetry setting; expecting one "
                    f"of {', '.join(otel.SETTINGS)}"
                )
            continue  # otel_settings_of reads them
        if mode == "triton" and key in _TRITON_KEYS:
            found[_TRITON_KEYS[key]] = [value]
        elif not mode and key in _GLOBAL_KEYS:
            if key == "level":
                levels.append(value)
                found["trace_level"] = levels
            else:
                found[_GLOBAL_KEYS[key]] = [value]
        else:
            raise ValueError(f"--trace-config {item}: unknown trace setting")
    return found


def _trace_mode(item: str, value: str) -> str:
    """``mode=``'s value, checked: opentelemetry needs its packages here."""
    if value not in ("triton", "opentelemetry"):
        raise ValueError(f"--trace-config {item}: the mode is triton or opentelemetry")
    absent = otel.missing() if value == "opentelemetry" else []
    if absent:
        raise ValueError(
            f"--trace-config {item}: OpenTelemetry trace export needs the Python "
            f"package(s) {', '.join(absent)} (pip install 'despina[otel]'): refusing to "
            "start rather than trace nothing; or use Triton's trace mode "
            "(--trace-config triton,file=PATH)"
        )
    return value


def otel_settings_of(args: argparse.Namespace) -> dict[str, list[str]]:
    """The ``--trace-config opentelemetry,<setting>=<value>`` settings by name (a
    repeated one keeps every value, in order: ``resource``); checked by
    ``trace_settings_of``."""
    found: dict[str, list[str]] = {}
    for item in args.trace_config:
        mode, _, setting = item.rpartition(",")
        key, _, value = setting.partition("=")
        if mode == "opentelemetry":
            found.setdefault(key, []).append(value)
    return found


def refuse(args: argparse.Namespace) -> list[str]:
    """Why the server must not start, for these flags (empty: it may)."""
    try:
        trace_settings_of(args)
    except ValueError as exc:
        return [str(exc)]
    return []
