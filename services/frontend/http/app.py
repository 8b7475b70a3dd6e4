"""The HTTP/REST frontend: KServe v2 routes with Triton's extensions, on aiohttp.

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
HEADER_LENGTH = "Inference-Header-Content-Length"


def error_response(exc: ServerError) -> web.Response:
    return web.Response(
        status=HTTP_STATUS.get(exc.code, 400),
        body=codec.encode_error(exc.message),
        content_type=JSON,
    )


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

    async def infer(request: web.Request) -> web.Response:
        info = request.match_info
        try:
            header_length = codec.parse_header_length(request.headers.get(HEADER_LENGTH))
            body = await request.read()
            inference = codec.decode_infer_request(
                body, header_length, info["model"], info.get("version", "")
            )
            result = await plane.infer(inference)
            try:
                payload, json_length = codec.encode_infer_response(result, inference)
            finally:
                plane.release(result)
        except ServerError as exc:
            return error_response(exc)
        except asyncio.CancelledError:
            raise
        if json_length is None:
            return web.Response(body=payload, content_type=JSON)
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(json_length)},
        )

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
