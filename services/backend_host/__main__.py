"""``despina backend-host``: run one backend host (compose, or under ``serve``).

``--framework onnxruntime|pytorch|python|tensorrt``. With ``--framework python`` this is
the launcher of Python instance processes, which it forks (backends/python/launcher.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from despina.common import streams
from despina.common.errors import ServerError, unsupported
from despina.common.frameworks import FRAMEWORKS, missing_extra
from despina.common.logs import setup_logging
from despina.common.settings import HostSettings
from despina.services.backend_host.backend import Backend, InstanceSpec
from despina.services.backend_host.host import BackendHost
from despina.services.flags import add_heartbeat_flags, add_inline_threshold, add_speed_paths
from despina.services.observability_flags import add_log_trace_flags, log_settings_of

log = logging.getLogger("despina.backend_host")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--framework", required=True, choices=FRAMEWORKS)
    parser.add_argument(
        "--scheduler",
        default="tcp://127.0.0.1:8012",
        help="the scheduler's endpoint for backend hosts (its --host-endpoint)",
    )
    parser.add_argument("--log-verbose", type=int, default=0)
    add_log_trace_flags(parser)
    parser.add_argument("--host-id", default=None)
    add_inline_threshold(parser)  # outputs this large come back through this host's arena
    add_speed_paths(parser)  # a host acts on busy polling, burst sends and loop execution
    add_heartbeat_flags(parser, timeout=False)


def make_backend(framework: str) -> Backend:
    missing = missing_extra(framework)
    if missing:
        raise unsupported(missing)
    if framework == "onnxruntime":
        from despina.services.backend_host.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend()
    if framework == "python":
        from despina.services.backend_host.backends.python.backend import PythonBackend

        return PythonBackend()
    raise unsupported(f"the {framework} backend is not available in this build of Despina yet")


async def run_instance(spec: InstanceSpec, args: argparse.Namespace, settings: HostSettings) -> int:
    """One Python model instance, in a process the launcher forked: load the model, then
    serve it as a backend host."""
    from despina.services.backend_host.backends.python.launcher import LOAD_FAILED_EXIT

    model, version, index = spec.model_name, spec.version, spec.instance_index
    host = BackendHost(
        args.scheduler,
        "python",
        None,
        host_id=f"python-{model}-{version}-{index}-{os.getpid()}",
        instance_of=(model, version, index),
        arena_threshold=args.inline_threshold,
        speed=settings.speed,
        statistics=settings.process.statistics,
        heartbeat_interval_s=args.host_heartbeat_interval_ms / 1000,
    )
    _install_signals(host)
    try:
        instance = make_backend("python").load(spec)
    except ServerError as exc:
        log.error("loading '%s' failed: %s", model, exc.message)
        await host.run(load_error=exc.message)
        return LOAD_FAILED_EXIT
    host.add_instance(spec, instance)
    await host.run()
    return 0


def run_python(args: argparse.Namespace, settings: HostSettings) -> int:
    """The Python launcher; in each instance process it forks, that instance."""
    import uvloop

    # Imported before the launcher forks: every instance process inherits them.
    from despina.services.backend_host.backends.python import backend as _  # noqa: F401
    from despina.services.backend_host.backends.python.launcher import PythonLauncher

    spec = PythonLauncher(args.scheduler, host_id=args.host_id).run()
    if spec is None:
        return 0
    return uvloop.run(run_instance(spec, args, settings))


async def run_host(args: argparse.Namespace, settings: HostSettings) -> int:
    try:
        backend = make_backend(args.framework)
    except ServerError as exc:
        log.error("%s", exc.message)
        return 2
    host = BackendHost(
        args.scheduler,
        args.framework,
        backend,
        host_id=args.host_id,
        arena_threshold=args.inline_threshold,
        speed=settings.speed,
        statistics=settings.process.statistics,
        heartbeat_interval_s=args.host_heartbeat_interval_ms / 1000,
    )
    _install_signals(host)
    await host.run()
    return 0


def _install_signals(host: BackendHost) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, host.stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="despina backend-host", allow_abbrev=False)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(f"backend-{args.framework}", args.log_verbose, log_settings_of(args))
    try:
        settings = HostSettings.from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        sys.exit(78)  # EX_CONFIG: restarting will not help
    settings.process.apply()
    log.info("%s", settings.speed.describe())
    try:
        streams.cluster_secret()  # an unreadable secret file is a setting to fix
    except OSError as exc:
        log.error("cannot read the cluster secret: %s", exc)
        sys.exit(78)  # EX_CONFIG: restarting will not help
    if args.framework == "python":
        sys.exit(run_python(args, settings))
    import uvloop

    sys.exit(uvloop.run(run_host(args, settings)))


if __name__ == "__main__":
    main()
