"""The HTTP/REST frontend on aiohttp: KServe v2 routes with Triton's extensions. The
fallback transport (``DESPINA_HTTP_TRANSPORT=aiohttp``); ``lean.py`` serves by default,
the same routes with the same behaviour.

Routes are thin: decode with ``codec``, call the data plane, encode. No middleware sits
on the path (each costs microseconds per request, and the frontend is the bottleneck:
docs/architecture.md#the-hot-path).

Limits (``limits.HttpLimits``) as far as aiohttp offers them: the maximum input size
(``client_max_size``; a Content-Length over it gets Triton's JSON 413 before the body is
read, instead of 100 Continue too), the budget for bodies still arriving in shared
memory, the idle keep-alive timeout, the URL (request line) and header sizes and the
header count. What differs from the lean transport: aiohttp answers an oversized request
line, header field or header count with 400 (not 414 or 431) and limits the size of each
header field, not their total; it has no header-read timeout and no connection cap.

Errors: every route answers Triton's JSON ``{"error": "..."}``, and so do a path no route
serves (404 ``Not Found``, a catch-all route) and a known path asked with another method
(405 ``Method Not Allowed`` with ``Allow``, a ``*`` route beside each handler): routes,
not middleware, so a request that matches pays nothing for them. What aiohttp answers
itself, before any route (malformed HTTP, an oversized request line or header), gets the
same JSON body from ``JsonErrorRunner``'s request handler.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import orjson
from aiohttp import web, web_protocol, web_response, web_server

from despina.common.errors import ServerError, invalid_arg
from despina.services.frontend import control
from despina.services.frontend.dataplane import DataPlane, index_ready, repository_parameters
from despina.services.frontend.http import codec, generate, routes
from despina.services.frontend.http.errors import HTTP_STATUS
from despina.services.frontend.http.limits import HttpLimits, too_large_message
from despina.services.frontend.inference import InferenceRequest, InferenceResult, forward_headers
from despina.services.frontend.restricted import Restrictions, http_group, http_message
from despina.services.frontend.unsupported import (
    unsupported,
)
from despina.services.identity import SERVER_HEADER

JSON = "application/json"
# Triton's answers (src/http_server.cc) to a path no route serves and to another method.


def error_response(exc: ServerError) -> web.Response:
    return web.Response(
        status=HTTP_STATUS.get(exc.code, 400),
        body=codec.encode_error(exc.message),
        content_type=JSON,
    )


async def read_into(request: web.Request, buffer: memoryview) -> memoryview:
    """Read the body (``Content-Length`` bytes) into ``buffer``; INVALID_ARG when it is
    shorter or longer than announced."""
    filled = 0
    size = buffer.nbytes
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        end = filled + len(chunk)
        if end > size:
            raise invalid_arg(f"the request body is longer than its Content-Length ({size})")
        buffer[filled:end] = chunk
        filled = end
    if filled != size:
        raise invalid_arg(
            f"the request body ended after {filled} bytes, Content-Length announced {size}"
        )
    return buffer


class _JsonErrorHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering the requests it refuses before any route
    (malformed HTTP, a request line or header past the limits) with Triton's JSON body
    instead of plain text; the status and the closing of the connection stay aiohttp's."""

    def handle_error(self, request, status=500, exc=None, message=None):  # type: ignore[no-untyped-def]
        response = super().handle_error(request, status, exc, message)
        reason = HTTPStatus(status).phrase
        text = (message or "").split("\n", 1)[0].rstrip(":") if status != 500 else ""
        response.body = codec.encode_error(f"{reason}: {text}" if text else reason)
        response.content_type = JSON
        return response


class _JsonErrorServer(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer aiohttp's own refusals in JSON."""

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        # The app builds a plain Server (its factory is private); the subclass only
        # changes which handler class each connection gets.
        server.__class__ = _JsonErrorServer
        return server


async def _respond(
    request: web.Request, result: InferenceResult, inference: InferenceRequest
) -> web.StreamResponse:
    """The response to an infer; large outputs go out from where they are (shared
    memory), not joined, and the transport has written them when this returns (the
    call may close then)."""
    parts, json_length = codec.encode_infer_response_parts(result, inference)
    headers = {} if json_length is None else {codec.HEADER_LENGTH_HEADER: str(json_length)}
    content_type = JSON if json_length is None else "application/octet-stream"
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    if size < codec.STREAM_RESPONSE_BYTES:
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        return web.Response(body=body, content_type=content_type, headers=headers)
    response = web.StreamResponse(headers=headers)
    response.content_type = content_type
    response.content_length = size
    await response.prepare(request)
    for part in parts:
        await response.write(part)
    await response.write_eof()
    # The transport may still hold views of the parts: wait until it has written them.
    transport = request.transport
    while transport is not None and not transport.is_closing():
        if transport.get_write_buffer_size() == 0:
            break
        await asyncio.sleep(0.001)
    return response


def handler_limits(limits: HttpLimits) -> dict[str, float | int]:
    """The ``web.AppRunner`` (request handler) arguments that enforce ``limits``."""
    return {
        "keepalive_timeout": limits.idle_timeout,
        # The request line: method, URL, version
        "max_line_size": limits.max_url_size + 32,
        "max_field_size": limits.max_header_size,
        "max_headers": limits.max_header_count,
    }


def build_app(
    plane: DataPlane,
    limits: HttpLimits | None = None,
    restrictions: Restrictions | None = None,
    forward: re.Pattern[str] | None = None,
) -> web.Application:
    """The aiohttp application serving ``plane``. Sets aiohttp's default ``Server``
    header, for this process, to Despina's (aiohttp reads it per response: no cost).
    Request headers whose name ``forward`` matches (--http-header-forward-pattern,
    ``inference.compile_forward_pattern``) reach the model as request parameters."""
    web_response.SERVER_SOFTWARE = SERVER_HEADER
    limits = limits or HttpLimits()
    max_input_size = limits.max_input_size
    pending = [0]  # shared memory reserved for bodies still arriving

    def too_large(request: web.BaseRequest) -> web.Response | None:
        size = request.content_length
        if size is None or size <= max_input_size:
            return None
        return web.Response(
            status=413,
            body=codec.encode_error(too_large_message(size, max_input_size)),
            content_type=JSON,
            headers={"Connection": "close"},
        )

    async def expect_handler(request: web.Request) -> web.Response | None:
        """Answer ``Expect: 100-continue``: 413 for a body over the limit."""
        refusal = too_large(request)
        if refusal is not None:
            return refusal
        expect = request.headers.get("Expect", "")
        if request.version == (1, 1):  # as aiohttp's default expect handler
            if expect.lower() != "100-continue":
                raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
            writer = request.writer
            await writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            writer.output_size = 0  # the response has not started
        return None

    # The handlers of routes.py's operations, each taking the request and its Match's
    # args; a ServerError they raise is answered by ``dispatch``.
    async def live(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(_: web.Request) -> web.Response:
        return web.Response(status=200 if await plane.ready() else 400)

    async def server_metadata(_: web.Request) -> web.Response:
        return web.Response(body=plane.server_metadata(), content_type=JSON)

    async def model_ready(_: web.Request, model: str, version: str) -> web.Response:
        ok = await plane.model_ready(model, version)
        return web.Response(status=200 if ok else 400)

    async def model_metadata(_: web.Request, model: str, version: str) -> web.Response:
        record = await plane.model_metadata(model, version)
        return web.Response(body=control.model_metadata_json(record), content_type=JSON)

    async def model_config(_: web.Request, model: str, version: str) -> web.Response:
        config = await plane.model_config(model, version)
        return web.Response(body=control.model_config_json(config), content_type=JSON)

    async def statistics(_: web.Request, model: str, version: str) -> web.Response:
        record = await plane.statistics(model, version)
        return web.Response(body=control.statistics_json(record), content_type=JSON)

    async def repository_index(request: web.Request) -> web.Response:
        index = await plane.repository_index(index_ready(await request.read()))
        return web.Response(body=control.repository_index_json(index), content_type=JSON)

    async def repository_load(request: web.Request, model: str) -> web.StreamResponse:
        refusal = too_large(request)
        if refusal is not None:
            return refusal
        await plane.repository_load(model, repository_parameters(await request.read()))
        return web.Response(status=200)

    async def repository_unload(request: web.Request, model: str) -> web.Response:
        await plane.repository_unload(model, repository_parameters(await request.read()))
        return web.Response(status=200)

    async def logging_settings(request: web.Request) -> web.Response:
        update = (await request.read() or b"{}") if request.method == "POST" else b""
        record = await plane.log_settings(update)
        return web.Response(body=control.log_settings_json(record), content_type=JSON)

    async def trace_setting(request: web.Request, model: str) -> web.Response:
        update = (await request.read() or b"{}") if request.method == "POST" else b""
        record = await plane.trace_setting(model, update)
        return web.Response(body=control.trace_settings_json(record), content_type=JSON)

    async def refuse(_: web.Request, message: str) -> web.Response:
        raise unsupported(message)

    async def infer(request: web.Request, model: str, version: str) -> web.StreamResponse:
        refusal = too_large(request)
        if refusal is not None:
            return refusal
        block = None
        reserved = 0
        try:
            header_length = codec.parse_header_length(
                request.headers.get(codec.HEADER_LENGTH_HEADER)
            )
            size = request.content_length
            if (
                header_length is not None
                and size is not None
                and pending[0] + size <= limits.max_pending_body_bytes
            ):
                block = plane.body_block(size)
                if block is not None:
                    reserved = size
                    pending[0] += size
            if block is not None:
                # Large binary tensors: read the body straight into shared memory, where
                # the backend host reads the inputs in place (docs/architecture.md#the-zero-copy-contract).
                try:
                    body: bytes | memoryview = await read_into(request, block.view)
                finally:
                    pending[0] -= reserved
                    reserved = 0
            else:
                body = await request.read()
            call = plane.call(block)
            block = None  # the call's now
            try:
                if header_length == 0:  # raw binary: the input's metadata from the config
                    config = await plane.model_config(model, version)
                    inference = codec.decode_raw_request(body, config.json, model, version)
                else:
                    inference = codec.decode_infer_request(body, header_length, model, version)
                if forward is not None:
                    forwarded = {
                        k.lower(): v
                        for k, v in request.headers.items()
                        if forward.search(k.lower())
                    }
                    if forwarded:
                        forward_headers(inference, forwarded)
                result = await plane.infer(call, inference)
                return await _respond(request, result, inference)
            finally:
                call.close()
        except web.HTTPRequestEntityTooLarge:  # a chunked body over the limit
            return web.Response(
                status=413,
                body=codec.encode_error(too_large_message(None, max_input_size)),
                content_type=JSON,
                headers={"Connection": "close"},
            )
        finally:
            pending[0] -= reserved
            plane.release_body(block)

    async def generate_one(request: web.Request, model: str, version: str) -> web.Response:
        refusal = too_large(request)
        if refusal is not None:
            return refusal
        body = await generate.generate_body(plane, model, version, await request.read())
        return web.Response(body=body, content_type=JSON)

    async def generate_stream(request: web.Request, model: str, version: str) -> web.StreamResponse:
        """As lean_ops._generate_stream: an error before the first response is an HTTP
        error, one after it an event."""
        refusal = too_large(request)
        if refusal is not None:
            return refusal
        events = generate.responses(plane, model, version, await request.read())
        try:
            item = await anext(events, None)
            if isinstance(item, ServerError):
                raise item
            response = web.StreamResponse(headers={"Content-Type": generate.EVENT_STREAM})
            await response.prepare(request)
            while item is not None:
                error = isinstance(item, ServerError)
                payload = generate.error_event(item) if error else item  # type: ignore[arg-type]
                await response.write(generate.event(payload))  # type: ignore[arg-type]
                item = None if error else await anext(events, None)
            await response.write_eof()
            return response
        finally:
            await events.aclose()

    async def shm_status(_: web.Request, cuda: bool, name: str) -> web.Response:
        status = await plane.shm_status(cuda, name)
        return web.Response(body=control.shm_status_any_json(status), content_type=JSON)

    async def shm_register(request: web.Request, cuda: bool, name: str) -> web.Response:
        refusal = too_large(request)
        if refusal is not None:
            return refusal
        try:
            args = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise invalid_arg(f"failed to parse the registration JSON: {exc}") from None
        if not isinstance(args, dict):
            raise invalid_arg("the registration body must be a JSON object")
        await plane.shm_register(cuda, name, args)
        return web.Response(status=200)

    async def shm_unregister(_: web.Request, cuda: bool, name: str) -> web.Response:
        await plane.shm_unregister(cuda, name)
        return web.Response(status=200)

    handlers: dict[str, Callable[..., Awaitable[web.StreamResponse]]] = {
        routes.LIVE: live,
        routes.READY: ready,
        routes.SERVER_METADATA: server_metadata,
        routes.MODEL_METADATA: model_metadata,
        routes.MODEL_READY: model_ready,
        routes.MODEL_CONFIG: model_config,
        routes.INFER: infer,
        routes.REPOSITORY_INDEX: repository_index,
        routes.STATISTICS: statistics,
        routes.REPOSITORY_LOAD: repository_load,
        routes.REPOSITORY_UNLOAD: repository_unload,
        routes.SHM_STATUS: shm_status,
        routes.SHM_REGISTER: shm_register,
        routes.SHM_UNREGISTER: shm_unregister,
        routes.LOGGING: logging_settings,
        routes.TRACE_SETTING: trace_setting,
        routes.UNSUPPORTED: refuse,
        routes.GENERATE: generate_one,
        routes.GENERATE_STREAM: generate_stream,
    }
    guards = {
        group: (header, value, codec.encode_error(http_message(header)))
        for group, (header, value) in (restrictions or {}).items()
    }

    def refused(request: web.BaseRequest) -> web.Response | None:
        """Triton's 403 when the path's API group is restricted and the request lacks
        the header of exactly that value (the first of its name)."""
        if not guards:
            return None
        guard = guards.get(http_group(request.path) or "")
        if guard is None or request.headers.get(guard[0]) == guard[1]:
            return None
        return web.Response(status=403, body=guard[2], content_type=JSON)

    async def dispatch(request: web.Request) -> web.StreamResponse:
        """Every request: routes.match, the restriction, the handler; the one place a
        ServerError becomes a response here."""
        found = routes.match(request.method, request.raw_path.partition("?")[0])
        if type(found) is routes.Miss:
            headers = {"Allow": found.allow} if found.allow else None
            return web.Response(
                status=found.status, body=found.body, content_type=JSON, headers=headers
            )
        refusal = refused(request)
        if refusal is not None:
            return refusal
        try:
            return await handlers[found.op](request, *found.args)  # type: ignore[union-attr]
        except ServerError as exc:
            return error_response(exc)

    async def expect(request: web.Request) -> web.StreamResponse | None:
        return refused(request) or await expect_handler(request)

    app = web.Application(client_max_size=max_input_size)
    app.router.add_route("*", "/{path:.*}", dispatch, expect_handler=expect)
    return app
