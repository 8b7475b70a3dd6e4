"""The gRPC frontend's server, built from tritonserver's ``--grpc-*`` flags.

``GrpcSettings`` is the one settings object (read from the parsed flags, which
``despina.services.flags`` declares); ``start_server`` binds and starts a server that
runs on the caller's event loop, beside the HTTP frontend: the lean transport
(``h2server``) where it can serve the settings, grpc.aio otherwise. Flags map to gRPC
core channel arguments as Triton maps them to its gRPC server builder.

grpc is imported only when grpc.aio serves: the package costs ~20 MiB of RSS in every
frontend process.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from despina.common.protos import service_pb2 as pb
from despina.services.frontend.dataplane import DataPlane
from despina.services.frontend.grpc.errors import GRPC_STATUS
from despina.services.frontend.grpc.h2server import (
    MAX_CONCURRENT_STREAMS_DEFAULT,
    H2Server,
    MethodHandler,
)
from despina.services.frontend.grpc.servicer import InferenceServicer
from despina.services.frontend.inference import compile_forward_pattern
from despina.services.frontend.restricted import Restrictions, grpc_error, grpc_group
from despina.services.frontend.restricted import parse as parse_restrictions

if TYPE_CHECKING:
    import grpc

SERVICE = "inference.GRPCInferenceService"
# Methods whose handlers take and return message bytes (the servicer parses them).
RAW_METHODS = frozenset({"ModelInfer", "ModelStreamInfer"})
# Unary methods the servicer can also start without a coroutine (h2server uses them).
UNARY_STARTS = {"ModelInfer": "start_model_infer"}

# Triton's --grpc-infer-response-compression-level -> grpc_compression_level.
COMPRESSION_LEVELS = {"none": 0, "low": 1, "medium": 2, "med": 2, "high": 3}
# Triton's gRPC default is INT32_MAX (src/common.h MAX_GRPC_MESSAGE_SIZE): 2 GiB a message
# (after decompression) is a memory bomb, so Despina takes --http-max-input-size's 64 MiB.
MAX_MESSAGE_SIZE = 64 * 1024 * 1024


class GrpcServer(Protocol):
    async def stop(self, grace: float | None) -> None: ...


class GrpcSetupError(Exception):
    """The settings cannot give a working server (bad certificate path, port taken);
    restarting with the same settings will not help."""


@dataclass(frozen=True)
class GrpcSettings:
    address: str = "0.0.0.0"
    port: int = 8001
    reuse_port: bool = False
    use_ssl: bool = False
    use_ssl_mutual: bool = False
    server_cert: str = ""
    server_key: str = ""
    root_cert: str = ""
    compression_level: str = "none"
    keepalive_time_ms: int = 7_200_000
    keepalive_timeout_ms: int = 20_000
    keepalive_permit_without_calls: bool = False
    http2_max_pings_without_data: int = 2
    http2_min_recv_ping_interval_without_data_ms: int = 300_000
    http2_max_ping_strikes: int = 2
    max_message_size: int = MAX_MESSAGE_SIZE
    http2_max_concurrent_streams: int = MAX_CONCURRENT_STREAMS_DEFAULT
    # --grpc-restricted-protocol values, parsed by start_server (frontend/restricted.py)
    restricted_protocols: tuple[str, ...] = ()
    # --grpc-header-forward-pattern, compiled by start_server (inference.py)
    header_forward_pattern: str = ""
    # "grpcio" serves with grpc.aio even where the lean transport (h2server) could; "auto"
    # picks the lean one where it can (DESPINA_GRPC_TRANSPORT, common/settings.py)
    transport: str = "auto"
    memo: bool = True  # request memos, one per connection (the speed path's switch)

    @classmethod
    def from_args(
        cls,
        args: argparse.Namespace,
        *,
        reuse_port: bool = False,
        transport: str = "auto",
        memo: bool = True,
    ) -> GrpcSettings:
        return cls(
            address=args.grpc_address,
            port=args.grpc_port,
            reuse_port=reuse_port,
            use_ssl=args.grpc_use_ssl,
            use_ssl_mutual=args.grpc_use_ssl_mutual,
            server_cert=args.grpc_server_cert,
            server_key=args.grpc_server_key,
            root_cert=args.grpc_root_cert,
            compression_level=args.grpc_infer_response_compression_level,
            keepalive_time_ms=args.grpc_keepalive_time,
            keepalive_timeout_ms=args.grpc_keepalive_timeout,
            keepalive_permit_without_calls=args.grpc_keepalive_permit_without_calls,
            http2_max_pings_without_data=args.grpc_http2_max_pings_without_data,
            http2_min_recv_ping_interval_without_data_ms=(
                args.grpc_http2_min_recv_ping_interval_without_data
            ),
            http2_max_ping_strikes=args.grpc_http2_max_ping_strikes,
            max_message_size=args.grpc_max_message_size,
            http2_max_concurrent_streams=args.grpc_http2_max_concurrent_streams,
            restricted_protocols=tuple(getattr(args, "grpc_restricted_protocol", None) or ()),
            header_forward_pattern=getattr(args, "grpc_header_forward_pattern", None) or "",
            transport=transport,
            memo=memo,
        )

    @property
    def target(self) -> str:
        host = self.address
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 literal
        return f"{host}:{self.port}"


def server_options(settings: GrpcSettings) -> list[tuple[str, int]]:
    """gRPC core channel arguments for ``settings``."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_size),
        ("grpc.max_send_message_length", settings.max_message_size),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", settings.http2_max_pings_without_data),
        (
            "grpc.http2.min_recv_ping_interval_without_data_ms",
            settings.http2_min_recv_ping_interval_without_data_ms,
        ),
        ("grpc.http2.max_ping_strikes", settings.http2_max_ping_strikes),
        ("grpc.max_concurrent_streams", settings.http2_max_concurrent_streams),
        # gRPC turns SO_REUSEPORT on by default, which would let a second server take a
        # busy port silently; only sibling frontends share it, on purpose.
        ("grpc.so_reuseport", int(settings.reuse_port)),
    ]
    level = COMPRESSION_LEVELS[settings.compression_level]
    if level:
        options.append(("grpc.default_compression_level", level))
    return options


def server_credentials(settings: GrpcSettings) -> grpc.ServerCredentials | None:
    """TLS credentials, None for a plaintext server. ``--grpc-use-ssl-mutual`` implies
    TLS and requires client certificates signed by ``--grpc-root-cert``.

    Raises GrpcSetupError naming the flag to fix.
    """
    if not (settings.use_ssl or settings.use_ssl_mutual):
        return None
    mode = "--grpc-use-ssl-mutual" if settings.use_ssl_mutual else "--grpc-use-ssl"
    key = _read(settings.server_key, "--grpc-server-key", mode)
    cert = _read(settings.server_cert, "--grpc-server-cert", mode)
    root = None
    if settings.use_ssl_mutual or settings.root_cert:
        root = _read(settings.root_cert, "--grpc-root-cert", mode)
    import grpc

    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=root, require_client_auth=settings.use_ssl_mutual
    )


def _read(path: str, flag: str, mode: str) -> bytes:
    if not path:
        raise GrpcSetupError(f"{mode} needs {flag}")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise GrpcSetupError(f"cannot read {flag} {path}: {exc.strerror}") from None


def method_handlers(
    servicer: InferenceServicer, restrictions: Restrictions | None = None
) -> dict[str, MethodHandler]:
    """The service's method handlers by method name, from its descriptor. ``RAW_METHODS``
    get no (de)serializer: their handlers see and return message bytes. A method of a
    group in ``restrictions`` requires its header (``MethodHandler.required``)."""
    restrictions = restrictions or {}
    handlers: dict[str, MethodHandler] = {}
    for method in pb.DESCRIPTOR.services_by_name[SERVICE.split(".")[-1]].methods:
        if method.client_streaming != method.server_streaming:  # pragma: no cover
            raise NotImplementedError(f"{method.full_name}: one-way streaming")
        if method.name in RAW_METHODS:
            deserializer = serializer = None
        else:
            deserializer = getattr(pb, method.input_type.name).FromString
            serializer = getattr(pb, method.output_type.name).SerializeToString
        handlers[method.name] = MethodHandler(
            getattr(servicer, method.name),
            deserializer,
            serializer,
            method.server_streaming,
            # Forwarding headers needs the call's metadata: the call runs in a task then
            None
            if servicer.forward is not None
            else getattr(servicer, UNARY_STARTS.get(method.name, ""), None),
            _required(restrictions.get(grpc_group(method.name) or "")),
        )
    return handlers


def _required(restriction: tuple[str, str] | None) -> tuple[bytes, bytes, int, str] | None:
    """A restriction as ``MethodHandler.required``: Triton answers UNAVAILABLE."""
    if restriction is None:
        return None
    header, value = restriction
    refusal = grpc_error(header)
    return header.lower().encode(), value.encode(), GRPC_STATUS[refusal.code], refusal.message


class _AioContext:
    """grpc.aio's context as the servicer calls it: ``abort`` with a ``Status``."""

    __slots__ = ("_context",)

    def __init__(self, context: Any) -> None:
        self._context = context

    async def abort(self, code: int, details: str = "") -> None:
        import grpc

        status = next((s for s in grpc.StatusCode if s.value[0] == code), grpc.StatusCode.UNKNOWN)
        await self._context.abort(status, details)

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()


def aio_handler(handler: MethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` as grpc.aio's method handler (which checks ``handler.required``
    before the call runs)."""
    import grpc

    behaviour = handler.behaviour
    if handler.required is not None:
        behaviour = _restricted(behaviour, handler.required, handler.streaming)
    if handler.streaming:

        async def stream(requests, context):
            async for response in behaviour(requests, _AioContext(context)):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )

    async def unary(request, context):
        return await behaviour(request, _AioContext(context))

    return grpc.unary_unary_rpc_method_handler(
        unary, handler.request_deserializer, handler.response_serializer
    )


def _restricted(
    behaviour: Callable, required: tuple[bytes, bytes, int, str], streaming: bool
) -> Callable:
    """``behaviour`` behind grpc.aio's check of a required header (the first of its name
    in the call's metadata); a call without it ends with the required status."""
    name, value = required[0].decode(), required[1].decode()
    code, message = required[2], required[3]

    def granted(context: _AioContext) -> bool:
        for key, got in context.invocation_metadata() or ():
            if key == name:
                return got == value
        return False

    if streaming:

        async def stream(requests, context):
            if not granted(context):
                await context.abort(code, message)
            async for response in behaviour(requests, context):
                yield response

        return stream

    async def unary(request, context):
        if not granted(context):
            await context.abort(code, message)
        return await behaviour(request, context)

    return unary


# Settings the lean transport acts as gRPC core does on their defaults only: keepalive
# pings from the server and limits on the client's pings.
_CORE_ONLY = (
    "keepalive_time_ms",
    "keepalive_timeout_ms",
    "keepalive_permit_without_calls",
    "http2_max_pings_without_data",
    "http2_min_recv_ping_interval_without_data_ms",
    "http2_max_ping_strikes",
)


def lean_transport(settings: GrpcSettings) -> bool:
    """Whether h2server can serve ``settings``: plaintext, no response compression,
    keepalive and ping settings at their defaults, and not turned off (``transport``)."""
    if settings.transport == "grpcio":
        return False
    if settings.use_ssl or settings.use_ssl_mutual or settings.compression_level != "none":
        return False
    defaults = {f.name: f.default for f in fields(GrpcSettings)}
    return all(getattr(settings, name) == defaults[name] for name in _CORE_ONLY)


async def start_server(plane: DataPlane, settings: GrpcSettings) -> GrpcServer:
    """Bind and start the gRPC server on the running loop; raises GrpcSetupError (also
    for a malformed --grpc-restricted-protocol or --grpc-header-forward-pattern)."""
    try:
        restrictions = parse_restrictions(
            settings.restricted_protocols, "--grpc-restricted-protocol"
        )
        forward = compile_forward_pattern(
            settings.header_forward_pattern, "--grpc-header-forward-pattern"
        )
    except ValueError as exc:
        raise GrpcSetupError(str(exc)) from None
    servicer = InferenceServicer(plane, forward, settings.memo)
    handlers = method_handlers(servicer, restrictions)
    if lean_transport(settings):
        lean = H2Server(
            {f"/{SERVICE}/{name}": h for name, h in handlers.items()},
            settings.max_message_size,
            settings.max_message_size,
            settings.http2_max_concurrent_streams,
            forward,
            connection_state=servicer.new_memo,  # a request memo per connection
        )
        lean.stamping = plane.tracing
        plane.on_tracing.append(partial(setattr, lean, "stamping"))
        try:
            await lean.listen(settings.address, settings.port, settings.reuse_port)
        except OSError as exc:
            raise GrpcSetupError(
                f"could not listen for gRPC on {settings.target}: {exc.strerror or exc}"
            ) from None
        return lean
    import grpc

    credentials = server_credentials(settings)
    server = grpc.aio.server(options=server_options(settings))
    # One generic handler, not grpc's registered methods (what the generated
    # add_..._to_server does): grpc.aio waits on one pending call per registered method
    # (asyncio.wait over all 21 at every call), measured ~35 us more CPU per call.
    aio_handlers = {name: aio_handler(h) for name, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, aio_handlers),))
    try:
        if credentials is None:
            server.add_insecure_port(settings.target)
        else:
            server.add_secure_port(settings.target, credentials)
    except RuntimeError as exc:
        raise GrpcSetupError(f"could not listen for gRPC on {settings.target}: {exc}") from None
    await server.start()
    return server
