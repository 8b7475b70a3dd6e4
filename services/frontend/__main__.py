"""``despina frontend``: run one frontend process, its HTTP/REST and gRPC servers on one
event loop (compose, or under ``serve``)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import re
import signal
import sys
import time
from typing import Protocol

from despina.common.logs import setup_logging
from despina.common.settings import FrontendSettings
from despina.services.flags import (
    add_grpc_flags,
    add_http_flags,
    add_inline_threshold,
    add_metrics_flags,
    add_speed_paths,
    parse_bool,
)
from despina.services.frontend.dataplane import DataPlane
from despina.services.frontend.grpc.h2server import H2Server
from despina.services.frontend.grpc.server import GrpcSettings, GrpcSetupError, start_server
from despina.services.frontend.http.limits import HttpLimits, raise_open_file_limit
from despina.services.frontend.inference import compile_forward_pattern
from despina.services.frontend.metrics import (
    MachineGauges,
    MetricsConfig,
    MetricsServer,
    StatsCollector,
)
from despina.services.frontend.restricted import Restrictions
from despina.services.frontend.restricted import parse as parse_restrictions
from despina.services.frontend.scheduler_client import SchedulerClient
from despina.services.identity import add_server_name
from despina.services.observability_flags import (
    add_log_trace_flags,
    log_settings_of,
    otel_settings_of,
)

log = logging.getLogger("despina.frontend")

# HTTP/REST is served by the lean transport (http/lean.py) unless DESPINA_HTTP_TRANSPORT
# (common/settings.py) says aiohttp (http/app.py): docs/architecture.md#settings.
# Each is imported only when it serves.

EXIT_CONFIG = 78  # EX_CONFIG: a setting is wrong; restarting will not help

# glibc mallopt parameters, and the values the frontend sets (see keep_large_buffers).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest
TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_large_buffers() -> None:
    """Let glibc reuse the memory of large buffers instead of mapping fresh pages for
    each one. A large gRPC message passes through several buffers of its size (grpc's
    own, then the response); by default glibc maps each from the system and unmaps it on
    free, and faulting the fresh pages in cost more than the copies themselves
    (docs/architecture.md#large-buffers-in-the-frontend). Buffers up to 32 MiB now come
    from the heap, and up to 256 MiB of free heap stays mapped for the next ones (the
    price: a frontend that served large tensors keeps that much). No-op where the C
    library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        pass


DEFAULT_REPLY = "tcp://0.0.0.0:8011"  # --reply-endpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scheduler",
        default="tcp://127.0.0.1:8012",
        help="the scheduler: its stream endpoint (unix:///path or tcp://host:port, the one "
        "backend hosts use) or its ZeroMQ endpoint (ipc:///path or zmq+tcp://host:port)",
    )
    parser.add_argument(
        "--reply-endpoint",
        default=None,
        help=f"the endpoint this frontend binds for replies from backend hosts (default "
        f"{DEFAULT_REPLY}; tcp://host:0: any free port; with --frontends N, frontend i "
        "binds port + i, or any free port when neither this nor --advertise-endpoint is "
        "given)",
    )
    parser.add_argument(
        "--advertise-endpoint",
        default=None,
        help="the reply endpoint as backend hosts reach it (default: --reply-endpoint)",
    )
    parser.add_argument(
        "--allow-http", type=parse_bool, nargs="?", const=True, default=True, help="serve HTTP/REST"
    )
    parser.add_argument("--http-address", default="0.0.0.0")
    parser.add_argument("--http-port", type=int, default=8000)
    add_http_flags(parser)
    add_grpc_flags(parser)
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="share the HTTP and gRPC ports with sibling frontends (SO_REUSEPORT)",
    )
    parser.add_argument(
        "--frontends",
        type=_positive,
        default=1,
        help="run this many frontend processes sharing the HTTP, gRPC and metrics ports "
        "(SO_REUSEPORT); the i-th (from 0) listens for replies on the reply endpoint's port "
        "plus i (a unix path gets '-i'), and advertises the same shift; this process "
        "only starts, restarts and stops them",
    )
    add_inline_threshold(parser)
    add_speed_paths(parser)  # a frontend acts on memos, busy polling, burst sends, direct routes
    add_server_name(parser)
    parser.add_argument("--exit-timeout-secs", type=float, default=30.0)
    parser.add_argument("--log-verbose", type=int, default=0)
    add_log_trace_flags(parser)
    add_metrics_flags(parser)


class HttpServer(Protocol):
    """The HTTP/REST server, whichever transport serves it."""

    async def start(self, host: str, port: int, reuse_port: bool) -> None:
        """Listen; raises OSError."""

    async def stop_listening(self) -> None:
        """Take no new connections; requests on open ones are still served."""

    async def stop(self, grace: float) -> None:
        """Let requests in flight finish for ``grace`` seconds, then close everything."""


class LeanHttp:
    def __init__(
        self,
        plane: DataPlane,
        limits: HttpLimits,
        restrictions: Restrictions,
        forward: re.Pattern[str] | None = None,
        memo: bool = True,
    ) -> None:
        from despina.services.frontend.http.lean import LeanHttpServer

        self.server = LeanHttpServer(plane, limits, restrictions, forward, memo=memo)

    async def start(self, host: str, port: int, reuse_port: bool) -> None:
        await self.server.listen(host, port, reuse_port)

    async def stop_listening(self) -> None:
        self.server.stop_listening()

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)


class AiohttpHttp:
    def __init__(
        self,
        plane: DataPlane,
        limits: HttpLimits,
        restrictions: Restrictions,
        forward: re.Pattern[str] | None = None,
        memo: bool = True,  # aiohttp's transport keeps no memo
    ) -> None:
        from aiohttp import web

        from despina.services.frontend.http.app import (
            JsonErrorRunner,
            build_app,
            handler_limits,
        )

        self.runner = JsonErrorRunner(
            build_app(plane, limits, restrictions, forward),
            access_log=None,
            handle_signals=False,
            **handler_limits(limits),
        )
        self.site: web.TCPSite | None = None

    async def start(self, host: str, port: int, reuse_port: bool) -> None:
        from aiohttp import web

        await self.runner.setup()
        self.site = web.TCPSite(self.runner, host, port, reuse_port=reuse_port or None)
        await self.site.start()

    async def stop_listening(self) -> None:
        if self.site is not None:
            await self.site.stop()

    async def stop(self, grace: float) -> None:
        await self.runner.cleanup()


async def amain(args: argparse.Namespace, settings: FrontendSettings) -> int:
    if args.advertise_endpoint and args.advertise_endpoint.endswith(":0"):
        log.error("--advertise-endpoint needs the port backend hosts reach, not 0")
        return EXIT_CONFIG
    client = SchedulerClient(
        args.scheduler,
        args.reply_endpoint or DEFAULT_REPLY,
        inline_threshold=args.inline_threshold,
        speed=settings.speed,
    )
    if args.advertise_endpoint:
        client.reply_endpoint = args.advertise_endpoint
    if args.allow_metrics and settings.process.statistics:
        client.count_statistics()
    try:
        await client.start()
    except Exception as exc:
        log.error("could not set up the scheduler connection: %s", exc)
        return EXIT_CONFIG
    metrics_server = None
    if args.allow_metrics:
        metrics_server = await start_metrics(client, args)
        if metrics_server is None:
            client.close()
            return EXIT_CONFIG
    plane = DataPlane(client, args.server_name, args.allow_metrics)
    plane.tracer.otel_settings = otel_settings_of(args)  # --trace-config opentelemetry,...
    http_server: HttpServer | None = None
    grpc_server = None
    if args.allow_http:
        limits = HttpLimits.from_args(args)
        try:
            restrictions = parse_restrictions(args.http_restricted_api, "--http-restricted-api")
            forward = compile_forward_pattern(
                args.http_header_forward_pattern, "--http-header-forward-pattern"
            )
        except ValueError as exc:
            log.error("%s", exc)
            client.close()
            return EXIT_CONFIG
        server_class = LeanHttp if settings.http_transport == "lean" else AiohttpHttp
        http_server = server_class(plane, limits, restrictions, forward, settings.speed.memo)
        try:
            await http_server.start(args.http_address, args.http_port, args.reuse_port)
        except OSError as exc:
            log.error(
                "could not listen for HTTP on %s:%d: %s", args.http_address, args.http_port, exc
            )
            await http_server.stop(0)
            client.close()
            return EXIT_CONFIG
        log.info("Started HTTPService at %s:%d", args.http_address, args.http_port)
    if args.allow_grpc:
        grpc = GrpcSettings.from_args(
            args,
            reuse_port=args.reuse_port,
            transport=settings.grpc_transport,
            memo=settings.speed.memo,
        )
        try:
            grpc_server = await start_server(plane, grpc)
        except GrpcSetupError as exc:
            log.error("%s", exc)
            if http_server is not None:
                await http_server.stop(0)
            client.close()
            return EXIT_CONFIG
        log.info(
            "Started GRPCInferenceService at %s (%s)",
            grpc.target,
            "lean HTTP/2 transport" if isinstance(grpc_server, H2Server) else "grpc.aio",
        )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    # Drain: stop taking connections and calls, let in-flight requests finish, then close.
    grpc_stopping = None
    if grpc_server is not None:
        grpc_stopping = asyncio.ensure_future(grpc_server.stop(args.exit_timeout_secs))
    if http_server is not None:
        await http_server.stop_listening()
    deadline = time.monotonic() + args.exit_timeout_secs
    while client.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if client.inflight:
        log.warning("exit timeout reached with %d request(s) in flight", client.inflight)
    if grpc_server is not None and grpc_stopping is not None:
        # Every request is answered: give the last responses a moment to be written,
        # then close what is left (idle streams a client keeps open).
        await grpc_server.stop(0.5)
        await grpc_stopping
    if http_server is not None:
        await http_server.stop(0.5)
    if metrics_server is not None:
        metrics_server.close()
    plane.tracer.close()  # traces not yet written, spans not yet sent
    client.close()
    return 0


async def start_metrics(client: SchedulerClient, args: argparse.Namespace) -> MetricsServer | None:
    """The /metrics endpoint on --metrics-address:--metrics-port, or None (logged) when
    --metrics-config is wrong or the port cannot be bound."""
    try:
        config = MetricsConfig.parse(args.metrics_config)
    except ValueError as exc:
        log.error("%s", exc)
        return None
    machine = MachineGauges(
        args.metrics_interval_ms / 1000, args.allow_cpu_metrics, args.allow_gpu_metrics
    )
    server = MetricsServer(client, StatsCollector(config, machine))
    try:
        await server.start(args.metrics_address, args.metrics_port, args.reuse_port)
    except OSError as exc:
        log.error(
            "could not listen for metrics on %s:%d: %s",
            args.metrics_address,
            args.metrics_port,
            exc,
        )
        return None
    log.info("Started Metrics Service at %s:%d", args.metrics_address, args.metrics_port)
    return server


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def nth_endpoint(endpoint: str, index: int) -> str:
    """The ``index``-th sibling's endpoint: ``tcp://host:port`` -> port + index (port 0,
    any free port, stays 0), ``unix:///path`` (or ``ipc://``) -> ``path-index``; index 0
    is ``endpoint`` itself. Raises ValueError for an endpoint of another form."""
    if index == 0 or endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        return endpoint
    if endpoint.startswith(("unix://", "ipc://")):
        return f"{endpoint}-{index}"
    scheme, sep, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) + index > 65535:
        raise ValueError(
            f"cannot derive the reply endpoint of frontend {index} from '{endpoint}' "
            "(expected tcp://host:port or unix:///path)"
        )
    return f"{scheme}://{host}:{int(port) + index}"


def sibling_argv(argv: list[str], args: argparse.Namespace, index: int) -> list[str]:
    """The command line of sibling ``index``: this one's, with the later flags winning
    (argparse keeps the last value) for its reply endpoints, one process and a shared port.
    With neither reply flag given, siblings after the first take any free port: port + 1
    of the default would be the scheduler's own port on the same machine."""
    if args.reply_endpoint is None and args.advertise_endpoint is None:
        reply = DEFAULT_REPLY if index == 0 else DEFAULT_REPLY.rpartition(":")[0] + ":0"
    else:
        reply = nth_endpoint(args.reply_endpoint or DEFAULT_REPLY, index)
    extra = [f"--reply-endpoint={reply}", "--frontends=1", "--reuse-port"]
    if args.advertise_endpoint:
        extra.append(f"--advertise-endpoint={nth_endpoint(args.advertise_endpoint, index)}")
    return [*argv, *extra]


def run_frontends(argv: list[str], args: argparse.Namespace) -> int:
    """``--frontends N``: start N frontend processes (``sibling_argv``), restart one that
    exits (a frontend's crash loses only its own connections), and on SIGTERM/SIGINT pass
    the signal on and wait for all (each drains its requests). A sibling that exits with
    EX_CONFIG (a wrong setting) stops them all with that code. Owns the children; they
    die with this process (``die_with_parent``)."""
    import subprocess

    from despina.common.process import die_with_parent

    try:
        commands = [
            [sys.executable, "-m", "despina.services.frontend", *sibling_argv(argv, args, i)]
            for i in range(args.frontends)
        ]
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    stopping = False
    code = 0

    def stop(_sig, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs = [subprocess.Popen(c, preexec_fn=die_with_parent) for c in commands]
    log.info("started %d frontends (pids %s)", len(procs), ", ".join(str(p.pid) for p in procs))
    exits: list[float] = []
    while not stopping:
        time.sleep(0.1)
        for i, proc in enumerate(procs):
            status = proc.poll()
            if status is None or stopping:
                continue
            now = time.monotonic()
            exits = [t for t in exits if now - t < 30] + [now]
            if status == EXIT_CONFIG or len(exits) > 5:
                log.error("frontend %d (pid %d) exited with %s; stopping", i, proc.pid, status)
                code = EXIT_CONFIG if status == EXIT_CONFIG else 1
                stopping = True
                break
            log.error("frontend %d (pid %d) exited with %s; restarting it", i, proc.pid, status)
            procs[i] = subprocess.Popen(commands[i], preexec_fn=die_with_parent)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + args.exit_timeout_secs + 5
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("frontend pid %d did not stop in time; killing it", proc.pid)
            proc.kill()
            proc.wait()
    return code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="despina frontend", allow_abbrev=False)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    setup_logging("frontend", args.log_verbose, log_settings_of(args))
    if args.frontends > 1:
        sys.exit(run_frontends(argv, args))
    try:
        settings = FrontendSettings.from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_CONFIG)
    settings.process.apply()
    log.info("%s", settings.speed.describe())
    keep_large_buffers()
    raise_open_file_limit()
    import uvloop

    sys.exit(uvloop.run(amain(args, settings)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
