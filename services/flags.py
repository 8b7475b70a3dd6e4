"""tritonserver's command-line flags, with their syntax (``--flag=value`` and
``--flag value``; booleans take true/false) and meaning, so a deployment script written
for ``tritonserver`` only needs the command name changed.

Flags that act today are declared with their type; the others are accepted, and the
log says that Despina ignores them for now.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("despina")


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


# Accepted for compatibility; not acted on yet. Value-taking unless listed in _BOOLEAN.
NOT_YET = (
    "--id",
    "--exit-on-error",
    "--disable-auto-complete-config",
    "--strict-model-config",
    "--strict-readiness",
    "--model-control-mode",
    "--repository-poll-secs",
    "--load-model",
    "--model-load-thread-count",
    "--model-load-retry-count",
    "--model-namespacing",
    "--backend-directory",
    "--backend-config",
    "--repoagent-directory",
    "--allow-grpc",
    "--allow-metrics",
    "--allow-gpu-metrics",
    "--allow-cpu-metrics",
    "--allow-sagemaker",
    "--allow-vertex-ai",
    "--http-header-forward-pattern",
    "--http-thread-count",
    "--http-restricted-api",
    "--grpc-address",
    "--grpc-header-forward-pattern",
    "--grpc-infer-allocation-pool-size",
    "--grpc-max-response-pool-size",
    "--grpc-use-ssl",
    "--grpc-use-ssl-mutual",
    "--grpc-server-cert",
    "--grpc-server-key",
    "--grpc-root-cert",
    "--grpc-infer-response-compression-level",
    "--grpc-keepalive-time",
    "--grpc-keepalive-timeout",
    "--grpc-keepalive-permit-without-calls",
    "--grpc-http2-max-pings-without-data",
    "--grpc-http2-min-recv-ping-interval-without-data",
    "--grpc-http2-max-ping-strikes",
    "--grpc-restricted-protocol",
    "--metrics-address",
    "--metrics-interval-ms",
    "--metrics-config",
    "--trace-config",
    "--trace-file",
    "--trace-level",
    "--trace-rate",
    "--trace-count",
    "--trace-log-frequency",
    "--log-info",
    "--log-warning",
    "--log-error",
    "--log-format",
    "--log-file",
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
    "--http-restricted-api",
    "--grpc-restricted-protocol",
}


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
    g.add_argument(
        "--grpc-port", type=int, default=8001, help="gRPC port (the gRPC frontend is not built yet)"
    )
    g.add_argument(
        "--metrics-port", type=int, default=8002, help="metrics port (metrics are not served yet)"
    )
    g.add_argument("--allow-http", type=parse_bool, nargs="?", const=True, default=True)
    g.add_argument("--log-verbose", type=int, default=0)
    g.add_argument("--exit-timeout-secs", type=float, default=30.0)
    g.add_argument(
        "--allow-client-shm",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        help="let clients register shared-memory regions (accepted; client shared memory is not built yet)",
    )
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
