"""Restricted APIs as Triton restricts them: ``--http-restricted-api`` and
``--grpc-restricted-protocol``, each ``<group>[,<group>...]:<header>=<value>``, repeatable.

A request of a restricted group must carry the header with exactly that value, else
Triton's refusal: HTTP 403 with ``{"error": "This API is restricted, expecting header
'<header>'"}``, gRPC UNAVAILABLE with ``This protocol is restricted, expecting header
'<header>'``. On gRPC the header is ``triton-grpc-protocol-<header>`` (Triton prefixes the
key given on the command line). Header names compare case-insensitively over HTTP/1.1
(gRPC metadata keys are lower case on the wire); values compare exactly; the first field
of that name counts.

The groups are Triton's (``src/restricted_features.h``); which route or method belongs
to which group follows Triton's ``http_server.cc`` and ``grpc_server.cc``. Parsing runs
once at start (a malformed value stops the server); the transports decide per route or
method once, so an unrestricted server pays nothing per request.
"""

from __future__ import annotations

from despina.common.errors import ServerError, unavailable

GROUPS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
HTTP_STATUS = 403

# A restricted group's (header name as given, required value); transports compare the
# name in lower case.
Restriction = tuple[str, str]
Restrictions = dict[str, Restriction]


def parse(values: list[str] | tuple[str, ...] | None, option: str) -> Restrictions:
    """``option``'s values (``--http-restricted-api`` or ``--grpc-restricted-protocol``)
    as group -> (header, value); the gRPC header carries Triton's prefix.

    Raises ValueError with the message to print (the server must not start): a value
    without ``:`` or ``=`` or with an empty part, an unknown group, a group named twice.
    """
    grpc = option == "--grpc-restricted-protocol"
    kind = "protocol" if grpc else "api"
    restrictions: Restrictions = {}
    for arg in values or ():
        colon = arg.find(":")
        equals = arg.find("=", colon + 1) if colon >= 0 else -1
        names, key, value = arg[:colon], arg[colon + 1 : equals], arg[equals + 1 :]
        if colon < 0 or equals < 0 or not names or not key or not value:
            raise ValueError(
                f"{option} option format is '<{kind} list>:<header>=<value>'. Got {arg}"
            )
        if any(not " " < c < "\x7f" for c in key) or any(c < " " or c == "\x7f" for c in value):
            raise ValueError(
                f"{option}: the header name must be visible ASCII and its value hold no "
                f"control characters. Got {arg!r}"
            )
        header = GRPC_HEADER_PREFIX + key if grpc else key
        for group in names.split(","):
            if group not in GROUPS:
                raise ValueError(
                    f"{option}: unknown restricted {kind} '{group}' (one of: {', '.join(GROUPS)})"
                )
            if group in restrictions:
                raise ValueError(
                    f"{option}: restricted {kind} '{group}' can not be specified in multiple "
                    "config groups"
                )
            restrictions[group] = (header, value)
    return restrictions


def http_message(header: str) -> str:
    return f"This API is restricted, expecting header '{header}'"


def grpc_error(header: str) -> ServerError:
    """The refusal of a gRPC call (UNAVAILABLE, as Triton answers it)."""
    return unavailable(f"This protocol is restricted, expecting header '{header}'")


def http_group(path: str) -> str | None:
    """The group of an HTTP request path (a real path or a route template such as
    ``/v2/models/{model}/ready``); None for a path of no group (404s)."""
    segments = path.split("/")
    if len(segments) < 2 or segments[1] != "v2":
        return None
    rest = segments[2:]
    if not rest:
        return "metadata"  # /v2
    head = rest[0]
    if head == "health":
        return "health"
    if head == "repository":
        return "model-repository"
    if head in ("systemsharedmemory", "cudasharedmemory"):
        return "shared-memory"
    if head == "trace":
        return "trace"
    if head == "logging":
        return "logging"
    if head != "models":
        return None
    rest = rest[1:]
    if rest == ["stats"]:
        return "statistics"  # /v2/models/stats
    rest = rest[1:]  # the model's name
    if len(rest) >= 2 and rest[0] == "versions":
        rest = rest[2:]
    if not rest:
        return "metadata"
    return _MODEL_ROUTES.get(rest[0])


_MODEL_ROUTES = {
    "ready": "health",
    "config": "model-config",
    "infer": "inference",
    "generate": "inference",
    "generate_stream": "inference",
    "stats": "statistics",
    "trace": "trace",
}

GRPC_GROUPS = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
    "ModelConfig": "model-config",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository",
    "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}


def grpc_group(method: str) -> str | None:
    """The group of a GRPCInferenceService method name (``ModelInfer``)."""
    group = GRPC_GROUPS.get(method)
    if group is None and "SharedMemory" in method:
        return "shared-memory"
    return group
