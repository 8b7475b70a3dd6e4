"""``despina scheduler``: run the scheduler service alone (compose, or under ``serve``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from despina.common import streams
from despina.common.errors import ServerError
from despina.common.logs import setup_logging
from despina.common.settings import SchedulerSettings
from despina.services.flags import (
    add_heartbeat_flags,
    add_model_control_flags,
    add_speed_paths,
    parse_bool,
)
from despina.services.observability_flags import (
    add_log_trace_flags,
    log_settings_of,
    trace_settings_of,
)
from despina.services.scheduler.model_control import ControlSettings
from despina.services.scheduler.server import SchedulerServer
from despina.services.scheduler.settings_store import SettingsStore

log = logging.getLogger("despina.scheduler")
EXIT_CONFIG = 78  # EX_CONFIG: a setting is wrong; restarting will not help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-repository",
        "--model-store",
        dest="model_repository",
        action="append",
        required=True,
    )
    parser.add_argument(
        "--endpoint",
        default="tcp://0.0.0.0:8010",
        help="ZeroMQ endpoint frontends may connect to (empty: none; frontends connect "
        "to --host-endpoint by default)",
    )
    parser.add_argument(
        "--host-endpoint",
        default="tcp://0.0.0.0:8012",
        help="stream endpoint (unix:///path or tcp://host:port) backend hosts connect to",
    )
    parser.add_argument(
        "--allow-client-shm",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        help="let clients register system shared-memory regions",
    )
    parser.add_argument(
        "--state-dir",
        default="",
        help="a folder where the scheduler keeps what clients changed, taken up again when "
        "it restarts: the models loaded in explicit model control (with their overrides), "
        "and the logging and trace settings (despina serve passes its runtime folder; "
        "compose: a volume); empty: none",
    )
    add_speed_paths(parser)  # the scheduler acts on burst sends and direct routes
    add_model_control_flags(parser)
    add_heartbeat_flags(parser, interval=False)
    parser.add_argument(
        "--disable-auto-complete-config",
        action="store_true",
        help="refuse configs that leave inputs or outputs to the model file (no auto-complete)",
    )
    parser.add_argument("--log-verbose", type=int, default=0)
    add_log_trace_flags(parser)


async def amain(args: argparse.Namespace, settings: SchedulerSettings) -> int:
    try:
        streams.cluster_secret()  # an unreadable secret file is a setting to fix
    except OSError as exc:
        log.error("cannot read the cluster secret: %s", exc)
        return EXIT_CONFIG
    try:
        server = SchedulerServer(
            args.endpoint,
            args.host_endpoint,
            [Path(p) for p in args.model_repository],
            allow_client_shm=args.allow_client_shm,
            speed=settings.speed,
            control=ControlSettings(
                args.model_control_mode,
                args.load_model,
                args.repository_poll_secs,
                args.strict_readiness,
                args.exit_on_error,
                args.model_load_thread_count,
                args.state_dir,
            ),
            settings=SettingsStore(log_settings_of(args), trace_settings_of(args), args.state_dir),
            instance_placement=args.instance_placement,
            heartbeat_timeout_s=args.host_heartbeat_timeout_ms / 1000,
        )
    except ServerError as exc:
        log.error("%s", exc.message)
        return EXIT_CONFIG
    except ValueError as exc:  # --trace-config (observability_flags.trace_settings_of)
        log.error("%s", exc)
        return EXIT_CONFIG
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop)
    await server.run()
    return server.model_control.exit_code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="despina scheduler", allow_abbrev=False)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging("scheduler", args.log_verbose, log_settings_of(args))
    if args.disable_auto_complete_config:
        from despina.common import model_config

        model_config.set_auto_complete(False)
    try:
        settings = SchedulerSettings.from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_CONFIG)
    settings.process.apply()
    log.info("%s", settings.speed.describe())
    import uvloop

    sys.exit(uvloop.run(amain(args, settings)))


if __name__ == "__main__":
    main()
