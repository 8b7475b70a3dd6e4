"""The ``despina`` command: ``serve`` (everything on one machine) or one service alone."""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: despina <command> [flags]

commands:
  serve          start the scheduler, a frontend and the backend hosts the model
                 repository needs (tritonserver's flags; the embedded default)
  scheduler      run the scheduler service alone
  frontend       run one frontend (HTTP and gRPC) alone
  backend-host   run one backend host alone (--framework onnxruntime|pytorch|python|tensorrt)
  perf           load one model of a running server (perf_analyzer's flags) and report
                 infer/s and latency percentiles

'despina <command> --help' describes each command's flags; 'despina --version' prints
Despina's version and the Triton release it answers as.
"""


def serve(argv: list[str]) -> int:
    from despina.common.logs import setup_logging
    from despina.common.settings import ProcessSettings, SpeedPaths
    from despina.services.flags import (
        add_speed_paths,
        add_triton_flags,
        refuse_unsupported_security,
        report_ignored,
    )
    from despina.services.identity import add_server_name
    from despina.services.supervisor import Supervisor, parse_backend_hosts

    parser = argparse.ArgumentParser(
        prog="despina serve",
        description="Serve a Triton model repository. Takes tritonserver's flags.",
        allow_abbrev=False,
    )
    add_triton_flags(parser)
    group = parser.add_argument_group("Despina flags")
    group.add_argument(
        "--frontends",
        type=int,
        default=1,
        help="number of frontend processes; each serves HTTP and gRPC, sharing the ports",
    )
    group.add_argument(
        "--backend-hosts",
        type=parse_backend_hosts,
        action="append",
        metavar="N|FRAMEWORK=N[,...]",
        help="backend hosts per framework (default 1), e.g. 'onnxruntime=3' or '2' for every "
        "framework (repeatable); each host loads every model of its framework, so extra "
        "hosts add capacity (docs/deployment.md#several-backend-hosts-and-frontends)",
    )
    group.add_argument(
        "--scheduler-transport",
        choices=("stream", "zmq"),
        default="stream",
        help="how frontends reach the scheduler: a unix-socket stream (measured ~10x cheaper "
        "per hop here) or ZeroMQ",
    )
    add_speed_paths(parser.add_argument_group("Despina's speed paths"))
    add_server_name(group)
    args = parser.parse_args(argv)
    from despina.services.observability_flags import log_settings_of

    setup_logging("serve", args.log_verbose, log_settings_of(args))
    refused = refuse_unsupported_security(args)
    if refused:
        for line in refused:
            print(f"despina serve: error: {line}", file=sys.stderr)
        return 2
    try:
        speed = SpeedPaths.from_args(args)
        process = ProcessSettings.from_environ()
    except ValueError as exc:
        print(f"despina serve: error: {exc}", file=sys.stderr)
        return 2
    process.apply()  # the supervisor removes what a crashed child left in the shm folder
    report_ignored(args)
    return Supervisor(args, speed).run()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version", "version"):
        from despina.services.identity import describe

        print(describe())
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        sys.exit(serve(rest))
    if command == "perf":
        from despina.services.perf.cli import main as perf

        sys.exit(perf(rest))
    if command == "scheduler":
        from despina.services.scheduler.__main__ import main as run
    elif command == "frontend":
        from despina.services.frontend.__main__ import main as run
    elif command == "backend-host":
        from despina.services.backend_host.__main__ import main as run
    else:
        print(f"despina: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    run(rest)


if __name__ == "__main__":
    main()
