"""tritonserver's command-line flags, with their syntax (``--flag=value`` and
``--flag value``; booleans take true/false) and meaning, so a deployment script written
for ``tritonserver`` only needs the command name changed.

Flags that act today are declared with their type; the others are accepted, and the
log says that Despina ignores them for now.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from despina.common.settings import BUSY_POLL_US, SPEED_PATHS_ENV, parse_switch
from despina.services.frontend.inference import compile_forward_pattern
from despina.services.frontend.restricted import parse as parse_restrictions

log = logging.getLogger("despina")


def parse_bool(value: str) -> bool:
    """tritonserver's boolean flag values (settings.parse_switch's spellings)."""
    try:
        return parse_switch(value, "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'") from None


# Accepted for compatibility; not acted on yet. Value-taking unless listed in _BOOLEAN.
NOT_YET = (
    "--id",
    "--model-load-retry-count",
    "--model-namespacing",
    "--backend-directory",
    "--backend-config",
    "--repoagent-directory",
    "--allow-sagemaker",
    "--allow-vertex-ai",
    "--http-thread-count",
    "--grpc-max-response-pool-size",
    "--cache-config",
    "--cache-directory",
    "--response-cache-byte-size",
    "--rate-limit",
    "--rate-limit-resource",
    "--pinned-memory-pool-byte-size",
    "--cuda-memory-pool-byte-size",
    "--cuda-virtual-address-size",
    "--min-supported-compute-capability",
    "--buffer-manager-thread-count",
    "--host-policy",
    "--enable-peer-access",
    "--model-config-name",
    "--model-load-gpu-limit",
    "--reuse-http-port",
    "--reuse-grpc-port",
    "--grpc-infer-thread-count",
    "--grpc-max-connection-age",
    "--grpc-max-connection-age-grace",
    "--sagemaker-port",
    "--sagemaker-safe-port-range",
    "--sagemaker-thread-count",
    "--vertex-ai-port",
    "--vertex-ai-thread-count",
    "--vertex-ai-default-model",
)

_REPEATABLE = {
    "--load-model",
    "--backend-config",
    "--rate-limit-resource",
    "--host-policy",
    "--trace-config",
    "--cache-config",
    "--metrics-config",
    "--cuda-memory-pool-byte-size",
    "--model-load-gpu-limit",
}


# tritonserver's gRPC flags that act (and Despina's own --grpc-max-message-size): one
# table, declared by both ``despina serve`` and ``despina frontend``, and forwarded from
# the first to the second by ``grpc_flag_argv``. (flag, type, default, help)
# Triton spells the middle level "medium"; "med" is kept for scripts written against
# earlier Despina.
_COMPRESSION_LEVELS = ("none", "low", "medium", "med", "high")
GRPC_FLAGS: tuple[tuple[str, Callable[[str], object], object, str], ...] = (
    ("--allow-grpc", parse_bool, True, "serve Triton's gRPC protocol"),
    ("--grpc-address", str, "0.0.0.0", "address the gRPC server binds"),
    ("--grpc-port", int, 8001, "gRPC port"),
    (
        "--grpc-infer-allocation-pool-size",
        int,
        8,
        "accepted for compatibility; has no meaning in Despina (Triton keeps a pool of "
        "reusable inference response objects; grpc.aio allocates per call)",
    ),
    ("--grpc-use-ssl", parse_bool, False, "serve gRPC over TLS (needs cert and key)"),
    (
        "--grpc-use-ssl-mutual",
        parse_bool,
        False,
        "mutual TLS: implies --grpc-use-ssl and requires client certificates signed by "
        "--grpc-root-cert",
    ),
    ("--grpc-server-cert", str, "", "PEM file of the server certificate"),
    ("--grpc-server-key", str, "", "PEM file of the server key"),
    ("--grpc-root-cert", str, "", "PEM file of the root certificate for client certificates"),
    (
        "--grpc-infer-response-compression-level",
        str,
        "none",
        "compression of gRPC responses to clients that accept it: none, low, med or high",
    ),
    (
        "--grpc-keepalive-time",
        int,
        7_200_000,
        "ms between keepalive pings (grpc.keepalive_time_ms)",
    ),
    (
        "--grpc-keepalive-timeout",
        int,
        20_000,
        "ms to wait for a keepalive ping's answer (grpc.keepalive_timeout_ms)",
    ),
    (
        "--grpc-keepalive-permit-without-calls",
        parse_bool,
        False,
        "send keepalive pings on connections with no call (grpc.keepalive_permit_without_calls)",
    ),
    (
        "--grpc-http2-max-pings-without-data",
        int,
        2,
        "pings sent without data before one must come (grpc.http2.max_pings_without_data)",
    ),
    (
        "--grpc-http2-min-recv-ping-interval-without-data",
        int,
        300_000,
        "ms allowed between a client's pings without data "
        "(grpc.http2.min_recv_ping_interval_without_data_ms)",
    ),
    (
        "--grpc-http2-max-ping-strikes",
        int,
        2,
        "bad pings before the connection is closed (grpc.http2.max_ping_strikes)",
    ),
    (
        "--grpc-http2-max-concurrent-streams",
        int,
        1000,
        "Despina's own: streams one gRPC connection may have open at once (advertised as "
        "SETTINGS_MAX_CONCURRENT_STREAMS; more are refused)",
    ),
    (
        "--grpc-max-message-size",
        int,
        64 * 1024 * 1024,
        "Despina's own: the largest gRPC message received (once decompressed) or sent, in "
        "bytes; 64 MiB as --http-max-input-size (Triton's INT32_MAX invites memory bombs)",
    ),
)


def add_grpc_flags(group: argparse._ActionsContainer) -> None:
    for flag, kind, default, text in GRPC_FLAGS:
        if kind is parse_bool:
            group.add_argument(
                flag, type=parse_bool, nargs="?", const=True, default=default, help=text
            )
        elif flag == "--grpc-infer-response-compression-level":
            group.add_argument(flag, choices=_COMPRESSION_LEVELS, default=default, help=text)
        else:
            group.add_argument(flag, type=kind, default=default, help=text)
    group.add_argument(
        "--grpc-restricted-protocol",
        action="append",
        default=[],
        metavar="<protocol list>:<key>=<value>",
        help="restrict gRPC protocol groups (health, metadata, inference, shared-memory, "
        "model-config, model-repository, statistics, trace, logging) to calls carrying the "
        "header triton-grpc-protocol-<key> with <value>; others get UNAVAILABLE (repeatable)",
    )
    group.add_argument(
        "--grpc-header-forward-pattern",
        default="",
        metavar="<regex>",
        help="request metadata whose key matches this regular expression (searched, "
        "case-insensitive unless it starts with (?-i)) reach the model as string request "
        "parameters",
    )


def grpc_flag_argv(args: argparse.Namespace) -> list[str]:
    """The gRPC flags of a parsed ``serve`` command line, as ``--flag=value`` arguments
    for a frontend."""
    argv = []
    for flag, _, _, _ in GRPC_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        text = ("true" if value else "false") if type(value) is bool else str(value)
        argv.append(f"{flag}={text}")
    argv += [f"--grpc-restricted-protocol={value}" for value in args.grpc_restricted_protocol]
    if args.grpc_header_forward_pattern:
        argv.append(f"--grpc-header-forward-pattern={args.grpc_header_forward_pattern}")
    return argv


# Tensors of at least this many bytes cross between Despina's processes on one machine
# through shared memory (a frontend's arena for inputs, a backend host's for outputs) and
# travel as refs; smaller ones ride the socket inline. Chosen by
# loadtest/experiments/inline_threshold.py (loadtest/README.md, "Inline threshold"); every service's
# default.
INLINE_THRESHOLD = 64 * 1024


def _count_of(unit: str, name: str) -> Callable[[str], int]:
    """An argparse type: a whole number of ``unit``, 0 or more."""

    def parse(value: str) -> int:
        count = int(value)
        if count < 0:
            raise argparse.ArgumentTypeError(f"expected a number of {unit} >= 0, got '{value}'")
        return count

    parse.__name__ = name  # argparse names it in "invalid <name> value"
    return parse


byte_count = _count_of("bytes", "byte_count")
microseconds = _count_of("µs", "microseconds")


def _seconds(value: str) -> float:
    """An argparse type: a number of seconds above 0."""
    seconds = float(value)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got '{value}'")
    return seconds


# The HTTP/1.1 frontend's limits (services/frontend/http/limits.py): Triton's
# --http-max-input-size and Despina's own; declared by ``despina serve`` and
# ``despina frontend``, forwarded from the first to the second by ``http_flag_argv``.
HTTP_FLAGS: tuple[tuple[str, Callable[[str], object], object, str], ...] = (
    (
        "--http-max-input-size",
        byte_count,
        64 * 1024 * 1024,
        "maximum input size in bytes for HTTP requests (a request body): larger ones get "
        "413 before their body is read",
    ),
    (
        "--http-max-header-size",
        byte_count,
        64 * 1024,
        "Despina's own: the most bytes of header fields a request may send (431 beyond; "
        "at most 8 MiB)",
    ),
    (
        "--http-max-url-size",
        byte_count,
        8 * 1024,
        "Despina's own: the longest request target (URL) in bytes (414 beyond)",
    ),
    (
        "--http-max-header-count",
        _count_of("header fields", "header_count"),
        100,
        "Despina's own: the most header fields a request may send (431 beyond)",
    ),
    (
        "--http-header-timeout-secs",
        _seconds,
        10.0,
        "Despina's own: a request's headers must arrive within this many seconds of its "
        "first byte (else 408 and close); a new connection must send its first request "
        "within it too",
    ),
    (
        "--http-idle-timeout-secs",
        _seconds,
        75.0,
        "Despina's own: a keep-alive connection with no request in flight, or a request "
        "body that stops arriving, is closed after this many seconds",
    ),
    (
        "--http-max-connections",
        _count_of("connections", "connection_count"),
        0,
        "Despina's own: open HTTP connections per frontend; more are answered 503 and "
        "closed, and the log says so (0: half the open-file limit)",
    ),
    (
        "--http-max-pending-body-bytes",
        byte_count,
        256 * 1024 * 1024,
        "Despina's own: shared memory a frontend sets aside for request bodies still "
        "arriving; past it, bodies are held as they arrive and copied once complete",
    ),
)


def add_http_flags(group: argparse._ActionsContainer) -> None:
    for flag, kind, default, text in HTTP_FLAGS:
        group.add_argument(flag, type=kind, default=default, help=text)
    group.add_argument(
        "--http-restricted-api",
        action="append",
        default=[],
        metavar="<api list>:<header>=<value>",
        help="restrict HTTP API groups (health, metadata, inference, shared-memory, "
        "model-config, model-repository, statistics, trace, logging) to requests carrying "
        "<header> with <value>; others get 403 (repeatable)",
    )
    group.add_argument(
        "--http-header-forward-pattern",
        default="",
        metavar="<regex>",
        help="request headers whose name matches this regular expression (searched, "
        "case-insensitive unless it starts with (?-i)) reach the model as string request "
        "parameters",
    )


def http_flag_argv(args: argparse.Namespace) -> list[str]:
    """The HTTP limit flags of a parsed ``serve`` command line, as ``--flag=value``
    arguments for a frontend."""
    argv = [f"{flag}={getattr(args, flag[2:].replace('-', '_'))}" for flag, _, _, _ in HTTP_FLAGS]
    if args.http_header_forward_pattern:
        argv.append(f"--http-header-forward-pattern={args.http_header_forward_pattern}")
    return argv + [f"--http-restricted-api={value}" for value in args.http_restricted_api]


def add_speed_paths(group: argparse._ActionsContainer) -> None:
    """The speed paths' switches (common/settings.py ``SpeedPaths``), declared alike by
    ``despina serve`` and every service; a path's own flag beats ``--speed-paths``."""
    group.add_argument(
        "--speed-paths",
        type=parse_bool,
        default=None,
        metavar="on|off",
        help="Despina's own: off turns every speed path below off (the plain path: each "
        "request decoded, each message sent at once, no polling, executions on their "
        "instance's thread, every request through the scheduler); a path's own flag "
        f"still turns it on (default: ${SPEED_PATHS_ENV}, else on)",
    )
    switches = (
        (
            "--request-memo",
            "frontends rebuild a request that repeats the last one's "
            "metadata from a template instead of decoding it",
        ),
        ("--burst-sends", "what one loop wake produced goes to each peer as one message"),
        (
            "--loop-execution",
            "a backend host runs a quick lone instance on its loop instead of its thread",
        ),
        (
            "--direct-routes",
            "frontends send requests for default-scheduled models (no "
            "batcher, no sequences) straight to a backend host; false: every request passes "
            "the scheduler",
        ),
    )
    for flag, text in switches:
        group.add_argument(
            flag, type=parse_bool, nargs="?", const=True, default=None, help=text + " (default on)"
        )
    group.add_argument(
        "--busy-poll-us",
        type=microseconds,
        default=None,
        metavar="US",
        help="under light load, frontends and backend hosts poll their sockets for up to this "
        "many µs when an answer is due instead of sleeping: about half the latency at "
        f"concurrency 1, for CPU spent polling; 0 turns it off (default {BUSY_POLL_US})",
    )


def add_model_control_flags(group: argparse._ActionsContainer) -> None:
    """tritonserver's model-control flags (services/scheduler/model_control.py), declared
    by ``despina serve`` and ``despina scheduler``; ``model_control_argv`` forwards them."""
    group.add_argument(
        "--model-control-mode",
        choices=("none", "poll", "explicit"),
        default="none",
        help="none: load every model at start; explicit: load the --load-model ones, then "
        "what clients load and unload; poll: load every model and follow the repository's "
        "changes every --repository-poll-secs",
    )
    group.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="explicit mode: a model to load at start (repeatable; '*' for every model)",
    )
    group.add_argument(
        "--repository-poll-secs",
        type=_seconds,
        default=15.0,
        help="poll mode: seconds between two looks at the repository (default %(default)s)",
    )
    group.add_argument(
        "--strict-readiness",
        type=parse_bool,
        nargs="?",
        const=True,
        default=True,
        help="true: the server is ready once every model it loads is; false: once it answers",
    )
    group.add_argument(
        "--exit-on-error",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        help="true: stop the server when a model fails to load at start (Triton's default "
        "is true; Despina's is false: a broken model is UNAVAILABLE and the others serve)",
    )
    group.add_argument(
        "--model-load-thread-count",
        type=_count_of("loads", "load_count"),
        default=4,
        help="models loaded at once by load requests and polls (default %(default)s)",
    )
    group.add_argument(
        "--instance-placement",
        choices=("per-host", "spread"),
        default="per-host",
        help="per-host: every backend host of a model's framework loads its instance_group "
        "count (a host that joins adds capacity); spread: the count is the total, spread "
        "over the hosts (docs/deployment.md, Placing instances)",
    )


def model_control_argv(args: argparse.Namespace) -> list[str]:
    """The model-control flags of a parsed ``serve`` command line, for the scheduler."""
    return [
        f"--model-control-mode={args.model_control_mode}",
        *[f"--load-model={name}" for name in args.load_model],
        f"--repository-poll-secs={args.repository_poll_secs}",
        f"--strict-readiness={'true' if args.strict_readiness else 'false'}",
        f"--exit-on-error={'true' if args.exit_on_error else 'false'}",
        f"--model-load-thread-count={args.model_load_thread_count}",
        f"--instance-placement={args.instance_placement}",
    ]


def add_metrics_flags(group: argparse._ActionsContainer, allow_metrics: bool = False) -> None:
    """tritonserver's metrics flags (services/frontend/metrics.py), declared by both
    ``despina serve`` and ``despina frontend``; ``metrics_flag_argv`` forwards them.
    ``allow_metrics``: --allow-metrics' default (False until counting costs under 3 %
    of throughput: docs/observability.md)."""
    group.add_argument(
        "--allow-metrics",
        type=parse_bool,
        nargs="?",
        const=True,
        default=allow_metrics,
        help="count statistics in every process, serve the statistics extension and "
        "Prometheus metrics on --metrics-port (default %(default)s: Triton's is true; in "
        "Despina counting still costs ~4-7%% of throughput at saturating loads, "
        "docs/observability.md)",
    )
    for flag, what in (("--allow-cpu-metrics", "CPU"), ("--allow-gpu-metrics", "GPU")):
        group.add_argument(
            flag,
            type=parse_bool,
            nargs="?",
            const=True,
            default=True,
            help=f"include the {what} metrics (default true)",
        )
    group.add_argument("--metrics-address", default="0.0.0.0", help="address of the metrics port")
    group.add_argument("--metrics-port", type=int, default=8002, help="metrics port")
    group.add_argument(
        "--metrics-interval-ms",
        type=int,
        default=2000,
        help="how often the machine gauges (CPU, GPU) are read, at most (the counts are "
        "exact at every scrape: processes report them within 100 ms)",
    )
    group.add_argument(
        "--metrics-config",
        action="append",
        default=[],
        metavar="<setting>=<value>",
        help="summary_latencies=true, summary_quantiles=<q>:<error>,..., "
        "histogram_latencies=true (repeatable)",
    )


def metrics_flag_argv(args: argparse.Namespace) -> list[str]:
    """The metrics flags of a parsed ``serve`` command line, for a frontend."""
    return [
        f"--allow-metrics={'true' if args.allow_metrics else 'false'}",
        f"--allow-cpu-metrics={'true' if args.allow_cpu_metrics else 'false'}",
        f"--allow-gpu-metrics={'true' if args.allow_gpu_metrics else 'false'}",
        f"--metrics-address={args.metrics_address}",
        f"--metrics-port={args.metrics_port}",
        f"--metrics-interval-ms={args.metrics_interval_ms}",
        *(f"--metrics-config={value}" for value in args.metrics_config),
    ]


def add_inline_threshold(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--inline-threshold",
        type=byte_count,
        default=INLINE_THRESHOLD,
        metavar="BYTES",
        help="tensors of at least this many bytes pass between Despina's processes through "
        "shared memory, smaller ones inline on the socket (default %(default)s)",
    )


def add_heartbeat_flags(
    group: argparse._ActionsContainer, *, interval: bool = True, timeout: bool = True
) -> None:
    """Failure detection (docs/deployment.md, "Failures"): backend hosts beat, the
    scheduler declares a host that falls silent gone."""
    if interval:
        group.add_argument(
            "--host-heartbeat-interval-ms",
            type=int,
            default=500,
            metavar="MS",
            help="backend hosts tell the scheduler they run this often, from a thread of "
            "their own (0: never; default %(default)s)",
        )
    if timeout:
        group.add_argument(
            "--host-heartbeat-timeout-ms",
            type=int,
            default=3000,
            metavar="MS",
            help="the scheduler declares a backend host gone after this long without its "
            "heartbeat: its requests fail or run again elsewhere (0: only when its "
            "connection closes; default %(default)s)",
        )


def add_triton_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tritonserver flags that act")
    g.add_argument(
        "--model-repository",
        "--model-store",
        dest="model_repository",
        action="append",
        required=True,
        help="path of a model repository (repeatable, as in Triton)",
    )
    g.add_argument("--http-address", default="0.0.0.0")
    g.add_argument("--http-port", type=int, default=8000)
    add_metrics_flags(g)
    g.add_argument("--allow-http", type=parse_bool, nargs="?", const=True, default=True)
    add_http_flags(g)
    add_grpc_flags(g)
    g.add_argument("--log-verbose", type=int, default=0)
    from despina.services.observability_flags import add_log_trace_flags

    add_log_trace_flags(g)  # --log-info/-warning/-error/-format/-file, --trace-*
    g.add_argument(
        "--strict-model-config",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        help="true: every model needs a complete config.pbtxt (no auto-complete)",
    )
    g.add_argument(
        "--disable-auto-complete-config",
        action="store_true",
        help="do not complete configs from the model files (as --strict-model-config=true)",
    )
    g.add_argument("--exit-timeout-secs", type=float, default=30.0)
    add_model_control_flags(g)
    g.add_argument(
        "--allow-client-shm",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        help="let clients register system shared-memory regions (refused with a clear error otherwise)",
    )
    add_inline_threshold(parser.add_argument_group("Despina's tensor transport"))
    add_heartbeat_flags(parser.add_argument_group("Despina's failure detection"))
    later = parser.add_argument_group("tritonserver flags accepted, not acted on yet")
    for flag in NOT_YET:
        dest = "ignored_" + flag[2:].replace("-", "_")
        if flag in _REPEATABLE:
            later.add_argument(
                flag, dest=dest, action="append", default=None, help=argparse.SUPPRESS
            )
        else:
            later.add_argument(
                flag, dest=dest, nargs="?", const="true", default=None, help=argparse.SUPPRESS
            )


# Accepted-but-unsupported flags whose meaning is to restrict what a client may do: were
# they ignored, the server would serve exactly what the operator meant to forbid. Given,
# they stop the server before it listens (fail closed). flag -> what it would restrict.
# (--http-restricted-api and --grpc-restricted-protocol act now: a malformed value of
# either stops the server, see refuse_unsupported_security.)
FAIL_CLOSED: dict[str, str] = {}

# Accepted flags that would make Despina serve something other than what was asked
# (another configuration file than each model's config.pbtxt): they stop the server with
# the reason, instead of argparse's bare "unrecognized arguments". flag -> why.
WRONG_IF_IGNORED: dict[str, str] = {
    "--model-config-name": "each model would be served with its config.pbtxt instead of the "
    "named configuration, and Despina does not read custom configuration names yet",
}


def refuse_unsupported_security(args: argparse.Namespace) -> list[str]:
    """Why the server must not start: one line for each security-relevant flag that was
    given but is not supported. Empty when the command line is safe to serve."""
    problems = []
    for option in ("--http-restricted-api", "--grpc-restricted-protocol"):
        try:
            parse_restrictions(getattr(args, option[2:].replace("-", "_"), None), option)
        except ValueError as exc:
            problems.append(f"{exc}: refusing to start")
    for option in ("--http-header-forward-pattern", "--grpc-header-forward-pattern"):
        try:
            compile_forward_pattern(getattr(args, option[2:].replace("-", "_"), None), option)
        except ValueError as exc:
            problems.append(f"{exc}: refusing to start")
    for flag, what in FAIL_CLOSED.items():
        if getattr(args, "ignored_" + flag[2:].replace("-", "_"), None) is not None:
            problems.append(
                f"{flag} restricts {what}, and Despina does not support it yet: refusing to "
                "start rather than serve without the restriction; remove the flag, or put "
                "the restriction in front of Despina (a proxy that checks the header)"
            )
    for flag, why in WRONG_IF_IGNORED.items():
        if getattr(args, "ignored_" + flag[2:].replace("-", "_"), None) is not None:
            problems.append(f"{flag}: {why}: refusing to start")
    if hasattr(args, "trace_config"):
        from despina.services.observability_flags import refuse

        problems += refuse(args)  # --trace-config mode=opentelemetry (fail closed)
    return problems


def auto_complete(args: argparse.Namespace) -> bool:
    """Whether configs are completed from model files (Triton's default): not under
    --strict-model-config=true or --disable-auto-complete-config."""
    return not (
        getattr(args, "strict_model_config", False)
        or getattr(args, "disable_auto_complete_config", False)
    )


def report_ignored(args: argparse.Namespace) -> list[str]:
    """Log each tritonserver flag that was given but does nothing yet; return their names."""
    given = []
    for key, value in vars(args).items():
        if key.startswith("ignored_") and value is not None:
            flag = "--" + key[len("ignored_") :].replace("_", "-")
            given.append(flag)
            log.warning(
                "%s is accepted for compatibility with tritonserver but not supported yet; ignoring it",
                flag,
            )
    return given
