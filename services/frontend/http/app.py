"""The HTTP/REST frontend on aiohttp: KServe v2 routes with Triton's extensions. The
fallback transport (``DESPINA_HTTP_TRANSPORT=aiohttp``); ``lean.py`` serves by default,
the same routes with the same behaviour.

Routes are thin: decode with ``codec``, call the data plane, encode. No middleware sits
on the path (each costs microseconds per request, and the frontend is the bottleneck:
DESIGN.md, "The hot path").
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from despina.common.errors import Code, ServerError, invalid_arg
from despina.services.frontend.dataplane import DataPlane
from despina.services.frontend.http import codec
from despina.services.frontend.http.errors import HTTP_STATUS

JSON = "application/json"


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


def build_app(plane: DataPlane, *, client_max_size: int = 2**31) -> web.Application:
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
            body = await plane.model_metadata(info["model"], info.get("version", ""))
        except ServerError as exc:
            return error_response(exc)
        return web.Response(body=body, content_type=JSON)

    async def model_config(request: web.Request) -> web.Response:
        info = request.match_info
        try:
            body = await plane.model_config(info["model"], info.get("version", ""))
        except ServerError as exc:
            return error_response(exc)
        return web.Response(body=body, content_type=JSON)

    async def repository_index(_: web.Request) -> web.Response:
        try:
            body = await plane.repository_index()
        except ServerError as exc:
            return error_response(exc)
        return web.Response(body=body, content_type=JSON)

    async def repository_control(request: web.Request) -> web.Response:
        return error_response(
            ServerError(
                Code.UNSUPPORTED,
                "explicit model load/unload is not supported yet: Despina runs in model "
                "control mode 'none' (every model in the repository is loaded at start)",
            )
        )

    async def infer(request: web.Request) -> web.StreamResponse:
        info = request.match_info
        block = None
        try:
            header_length = codec.parse_header_length(
                request.headers.get(codec.HEADER_LENGTH_HEADER)
            )
            size = request.content_length
            if header_length is not None and size is not None:
                block = plane.body_block(size)
            if block is not None:
                # Large binary tensors: read the body straight into shared memory, where
                # the backend host reads the inputs in place (the one copy of DESIGN.md).
                body: bytes | memoryview = await read_into(request, block.view)
            else:
                body = await request.read()
            inference = codec.decode_infer_request(
                body, header_length, info["model"], info.get("version", "")
            )
            inference.body_block = block
            result = await plane.infer(inference)
            try:
                parts, json_length = codec.encode_infer_response_parts(result, inference)
                headers = (
                    {} if json_length is None else {codec.HEADER_LENGTH_HEADER: str(json_length)}
                )
                content_type = JSON if json_length is None else "application/octet-stream"
                size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
                if size < codec.STREAM_RESPONSE_BYTES:
                    body = parts[0] if len(parts) == 1 else b"".join(parts)
                    return web.Response(body=body, content_type=content_type, headers=headers)
                # Large outputs go out from where they are (shared memory), not joined.
                response = web.StreamResponse(headers=headers)
                response.content_type = content_type
                response.content_length = size
                await response.prepare(request)
                for part in parts:
                    await response.write(part)
                await response.write_eof()
                # The transport may still hold views of the parts: keep the shared-memory
                # blocks until it has written them.
                transport = request.transport
                while transport is not None and not transport.is_closing():
                    if transport.get_write_buffer_size() == 0:
                        break
                    await asyncio.sleep(0.001)
                return response
            finally:
                plane.release(result)
        except ServerError as exc:
            return error_response(exc)
        finally:
            plane.drop(block)

    def shm_routes(cuda: bool):
        async def status(request: web.Request) -> web.Response:
            try:
                body = await plane.shm_status(cuda, request.match_info.get("name", ""))
            except ServerError as exc:
                return error_response(exc)
            return web.Response(body=body, content_type=JSON)

        async def register(request: web.Request) -> web.Response:
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

    app = web.Application(client_max_size=client_max_size)
    add = app.router.add_route
    add("GET", "/v2/health/live", live)
    add("GET", "/v2/health/ready", ready)
    add("GET", "/v2", server_metadata)
    add("POST", "/v2/repository/index", repository_index)
    add("POST", "/v2/repository/models/{model}/load", repository_control)
    add("POST", "/v2/repository/models/{model}/unload", repository_control)
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
    return app
