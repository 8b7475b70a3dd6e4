"""The HTTP/REST frontend on aiohttp: KServe v2 routes with Triton's extensions. The
fallback transport (``DESPINA_HTTP_TRANSPORT=aiohttp``); ``lean.py`` serves by default,
the same routes with the same behaviour.

Routes are thin: decode with ``codec``, call the data plane, encode. No middleware sits
on the path (each costs microseconds per request, and the frontend is the bottleneck:
DESIGN.md, "The hot path").

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
from despina.services.frontend.dataplane import DataPlane
from despina.services.frontend.http import codec
from despina.services.frontend.http.errors import HTTP_STATUS
from despina.services.frontend.http.limits import HttpLimits, too_large_message
from despina.services.frontend.inference import InferenceRequest, InferenceResult, forward_headers
from despina.services.frontend.restricted import Restrictions, http_group, http_message
from despina.services.frontend.unsupported import (
    LOGGING,
    MODEL_CONTROL,
    STATISTICS,
    TRACE,
    unsupported,
)
from despina.services.identity import SERVER_HEADER

JSON = "application/json"
# Triton's answers (src/http_server.cc) to a path no route serves and to another method.
NOT_FOUND = codec.encode_error("Not Found")
NOT_ALLOWED = codec.encode_error("Method Not Allowed")


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


def add_error_routes(app: web.Application) -> None:
    """Give every resource of ``app`` a ``*`` route answering Triton's JSON 405 (with
    ``Allow``), and add a last catch-all route answering its JSON 404. Call once, after
    the other routes: aiohttp tries a resource's routes in order and the catch-all's
    resource (indexed under ``/``) after every more specific one."""

    def not_allowed(allow: str):
        async def handler(_: web.Request) -> web.Response:
            return web.Response(
                status=405, body=NOT_ALLOWED, content_type=JSON, headers={"Allow": allow}
            )

        return handler

    async def not_found(_: web.Request) -> web.Response:
        return web.Response(status=404, body=NOT_FOUND, content_type=JSON)

    for resource in list(app.router.resources()):
        if isinstance(resource, web.Resource):
            allow = ",".join(sorted({route.method for route in resource}))
            resource.add_route("*", not_allowed(allow))
    app.router.add_route("*", "/{path:.*}", not_found)


def restrict(
    handler, expect_handler, restriction: tuple[str, str]
) -> tuple[Callable[[web.Request], Awaitable[web.StreamResponse]], Callable]:
    """``handler`` and its ``expect_handler`` behind a restricted API's check (Triton's
    403 for a request without the header of exactly that value, the first of its name)."""
    header, value = restriction
    refusal = codec.encode_error(http_message(header))

    def refused(request: web.BaseRequest) -> web.Response | None:
        if request.headers.get(header) == value:
            return None
        return web.Response(status=403, body=refusal, content_type=JSON)

    async def guarded(request: web.Request) -> web.StreamResponse:
        return refused(request) or await handler(request)

    async def guarded_expect(request: web.Request) -> web.StreamResponse | None:
        return refused(request) or await expect_handler(request)

    return guarded, guarded_expect


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

    async def live(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(_: web.Request) -> web.Response:
        return web.Response(status=200 if await plane.ready() else 400)

    async def server_metadata(_: web.Request) -> web.Response:
        return web.Response(body=plane.server_metadata(), content_type=JSON)

    async def model_ready(request: web.Request) -> web.Response:
        info = request.match_info
        ok = await plane.model_ready(info["model"], info.get("version", ""))
        return web.Response(status=200 if ok else 400)

    async def model_metadata(request: web.Request) -> web.Response:
        info = request.match_info
        try:
            record = await plane.model_metadata(info["model"], info.get("version", ""))
        except ServerError as exc:
            return error_response(exc)
        return web.Response(body=control.model_metadata_json(record), content_type=JSON)

    async def model_config(request: web.Request) -> web.Response:
        info = request.match_info
        try:
            config = await plane.model_config(info["model"], info.get("version", ""))
        except ServerError as exc:
            return error_response(exc)
        return web.Response(body=control.model_config_json(config), content_type=JSON)

    async def repository_index(_: web.Request) -> web.Response:
        try:
            index = await plane.repository_index()
        except ServerError as exc:
            return error_response(exc)
        return web.Response(body=control.repository_index_json(index), content_type=JSON)

    def unsupported_route(message: str):
        async def refuse(_: web.Request) -> web.Response:
            return error_response(unsupported(message))

        return refuse

    async def infer(request: web.Request) -> web.StreamResponse:
        info = request.match_info
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
                # the backend host reads the inputs in place (the one copy of DESIGN.md).
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
                    config = await plane.model_config(info["model"], info.get("version", ""))
                    inference = codec.decode_raw_request(
                        body, config.json, info["model"], info.get("version", "")
                    )
                else:
                    inference = codec.decode_infer_request(
                        body, header_length, info["model"], info.get("version", "")
                    )
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
        except ServerError as exc:
            return error_response(exc)
        except web.HTTPRequestEntityTooLarge:  # a chunked body over the limit
            return web.Response(
                status=413,
                body=codec.encode_error(too_large_message(None, max_input_size)),
                content_type=JSON,
                headers={"Connection": "close"},
            )
        finally:
            pending[0] -= reserved
            plane.drop(block)

    def shm_routes(cuda: bool):
        async def status(request: web.Request) -> web.Response:
            try:
                status = await plane.shm_status(cuda, request.match_info.get("name", ""))
            except ServerError as exc:
                return error_response(exc)
            return web.Response(body=control.shm_status_any_json(status), content_type=JSON)

        async def register(request: web.Request) -> web.Response:
            refusal = too_large(request)
            if refusal is not None:
                return refusal
            try:
                try:
                    args = orjson.loads(await request.read())
                except orjson.JSONDecodeError as exc:
                    raise invalid_arg(f"failed to parse the registration JSON: {exc}") from None
                if not isinstance(args, dict):
                    raise invalid_arg("the registration body must be a JSON object")
                await plane.shm_register(cuda, request.match_info["name"], args)
            except ServerError as exc:
                return error_response(exc)
            return web.Response(status=200)

        async def unregister(request: web.Request) -> web.Response:
            try:
                await plane.shm_unregister(cuda, request.match_info.get("name", ""))
            except ServerError as exc:
                return error_response(exc)
            return web.Response(status=200)

        return status, register, unregister

    app = web.Application(client_max_size=max_input_size)

    def add(method: str, path: str, handler) -> None:
        expect = expect_handler
        restriction = (restrictions or {}).get(http_group(path) or "")
        if restriction is not None:  # decided per route here: nothing for other routes
            handler, expect = restrict(handler, expect_handler, restriction)
        app.router.add_route(method, path, handler, expect_handler=expect)

    add("GET", "/v2/health/live", live)
    add("GET", "/v2/health/ready", ready)
    add("GET", "/v2", server_metadata)
    add("POST", "/v2/repository/index", repository_index)
    add("POST", "/v2/repository/models/{model}/load", unsupported_route(MODEL_CONTROL))
    add("POST", "/v2/repository/models/{model}/unload", unsupported_route(MODEL_CONTROL))
    # Before /v2/models/{model}: Triton reads /v2/models/stats as every model's statistics.
    for path in ("/v2/models/stats", "/v2/models/{model}/stats"):
        add("GET", path, unsupported_route(STATISTICS))
    add("GET", "/v2/models/{model}/versions/{version}/stats", unsupported_route(STATISTICS))
    for path, message in (
        ("/v2/trace/setting", TRACE),
        ("/v2/models/{model}/trace/setting", TRACE),
        ("/v2/logging", LOGGING),
    ):
        add("GET", path, unsupported_route(message))
        add("POST", path, unsupported_route(message))
    for cuda, root in ((False, "/v2/systemsharedmemory"), (True, "/v2/cudasharedmemory")):
        status, register, unregister = shm_routes(cuda)
        add("GET", root + "/status", status)
        add("GET", root + "/region/{name}/status", status)
        add("POST", root + "/region/{name}/register", register)
        add("POST", root + "/region/{name}/unregister", unregister)
        add("POST", root + "/unregister", unregister)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        add("GET", prefix, model_metadata)
        add("GET", prefix + "/ready", model_ready)
        add("GET", prefix + "/config", model_config)
        add("POST", prefix + "/infer", infer)
    add_error_routes(app)
    return app
