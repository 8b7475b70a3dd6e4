"""``despina backend-host``: run one backend host (compose, or under ``serve``).

``--framework onnxruntime|pytorch|python|tensorrt``. With ``--framework python`` this is
the launcher of Python instance processes; with ``--instance-of`` too it is one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from despina.common.errors import ServerError, unsupported
from despina.common.frameworks import FRAMEWORKS
from despina.common.logs import setup_logging
from despina.services.backend_host.backend import Backend, InstanceSpec
from despina.services.backend_host.worker import BackendHost

log = logging.getLogger("despina.backend_host")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--framework", required=True, choices=FRAMEWORKS)
    parser.add_argument(
        "--scheduler",
        default="tcp://127.0.0.1:8012",
        help="the scheduler's endpoint for backend hosts (its --host-endpoint)",
    )
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--host-id", default=None)
    # A Python instance process (started by the Python launcher).
    parser.add_argument("--instance-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--instance-kind", default="KIND_CPU", help=argparse.SUPPRESS)
    parser.add_argument("--device-id", type=int, default=0, help=argparse.SUPPRESS)


def make_backend(framework: str) -> Backend:
    if framework == "onnxruntime":
        from despina.services.backend_host.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend()
    if framework == "python":
        from despina.services.backend_host.backends.python.backend import PythonBackend

        return PythonBackend()
    raise unsupported(f"the {framework} backend is not available in this build of Despina yet")


async def run_instance(args: argparse.Namespace) -> int:
    """One Python model instance: load the model, then serve it as a backend host."""
    from despina.services.backend_host.backends.python.launcher import CONFIG_ENV, LOAD_FAILED_EXIT

    model, version, index = args.instance_of.rsplit(":", 2)
    config = os.environ[CONFIG_ENV].encode()  # Triton's JSON form: no protobuf here
    spec = InstanceSpec(
        model, version, Path(args.model_dir), config, int(index), args.instance_kind, args.device_id
    )
    host = BackendHost(
        args.scheduler,
        "python",
        None,
        host_id=f"python-{model}-{version}-{index}-{os.getpid()}",
        instance_of=(model, version, int(index)),
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


async def run_host(args: argparse.Namespace) -> int:
    if args.framework == "python":
        from despina.services.backend_host.backends.python.launcher import PythonLauncher

        host = BackendHost(args.scheduler, "python", None, host_id=args.host_id)
        launcher = PythonLauncher(host, args.scheduler, args.log_verbose)
        supervisor = asyncio.get_running_loop().create_task(launcher.supervise())
        _install_signals(host)
        try:
            await host.run()
        finally:
            supervisor.cancel()
            launcher.stop_all()
        return 0
    try:
        backend = make_backend(args.framework)
    except ServerError as exc:
        log.error("%s", exc.message)
        return 2
    host = BackendHost(args.scheduler, args.framework, backend, host_id=args.host_id)
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
    setup_logging(f"backend-{args.framework}", args.log_verbose)
    import uvloop

    runner = run_instance if args.instance_of else run_host
    sys.exit(uvloop.run(runner(args)))


if __name__ == "__main__":
    main()
