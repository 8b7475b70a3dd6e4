"""The lean HTTP transport's handlers of the route table's operations (routes.py): each
answers through ``conn._reply`` (or ``conn._send_parts``); those in ``SYNC`` run in the
parser's callback and answer before returning (infer: from its call's done callback), the
others are coroutines run as one task per request. A ServerError they raise is answered
by ``_Connection._answer_error``, the one place it becomes a response."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from despina.common.errors import ServerError, invalid_arg
from despina.services.frontend import control
from despina.services.frontend.call import InferCall
from despina.services.frontend.dataplane import DataPlane, index_ready, repository_parameters
from despina.services.frontend.http import codec, generate, routes
from despina.services.frontend.inference import (
    InferenceRequest,
    InferenceResult,
    forward_headers,
)
from despina.services.frontend.unsupported import unsupported

if TYPE_CHECKING:
    from despina.services.frontend.http.lean import _Connection, _Request

JSON = b"Content-Type: application/json\r\n"
OCTETS = b"Content-Type: application/octet-stream\r\n"
EVENT_STREAM = b"Content-Type: %s\r\n" % generate.EVENT_STREAM.encode()
HEADER_LENGTH = codec.HEADER_LENGTH_HEADER.encode()


# Each handler answers through conn._reply (or _send_parts); those in _SYNC return
# before awaiting anything and run without a task (one that waits for a future sets
# conn.task to it and answers from the future's callback); the others run in a task.


def _live(conn: _Connection, req: _Request) -> None:
    conn._reply(req, 200, b"", b"", b"")


async def _ready(conn: _Connection, req: _Request) -> None:
    conn._reply(req, 200 if await conn.plane.ready() else 400, b"", b"", b"")


def _server_metadata(conn: _Connection, req: _Request) -> None:
    conn._reply(req, 200, conn.plane.server_metadata(), JSON, b"")


async def _model_ready(conn: _Connection, req: _Request, model: str, version: str) -> None:
    ok = await conn.plane.model_ready(model, version)
    conn._reply(req, 200 if ok else 400, b"", b"", b"")


async def _answer_json(
    conn: _Connection, req: _Request, pending: Awaitable[Any], encode: Callable[[Any], bytes]
) -> None:
    """Answer with ``encode(record)`` (services/frontend/control.py); an error goes to
    ``_Connection._answer_error`` through ``_run``."""
    body = encode(await pending)
    conn._reply(req, 200, body, JSON, b"")


async def _answer_empty(conn: _Connection, req: _Request, pending: Awaitable[None]) -> None:
    await pending
    conn._reply(req, 200, b"", b"", b"")


def _model_metadata(conn: _Connection, req: _Request, model: str, version: str) -> Awaitable:
    return _answer_json(
        conn, req, conn.plane.model_metadata(model, version), control.model_metadata_json
    )


def _model_config(conn: _Connection, req: _Request, model: str, version: str) -> Awaitable:
    return _answer_json(
        conn, req, conn.plane.model_config(model, version), control.model_config_json
    )


async def _repository_index_call(plane: DataPlane, body: bytes) -> Any:
    return await plane.repository_index(index_ready(body))


def _statistics(conn: _Connection, req: _Request, model: str, version: str) -> Awaitable:
    return _answer_json(conn, req, conn.plane.statistics(model, version), control.statistics_json)


def _repository_index(conn: _Connection, req: _Request) -> Awaitable:
    return _answer_json(
        conn, req, _repository_index_call(conn.plane, req.body), control.repository_index_json
    )


async def _repository_control(
    act: Callable[[str, dict], Awaitable[None]], model: str, body: bytes
) -> None:
    await act(model, repository_parameters(body))


def _repository_load(conn: _Connection, req: _Request, model: str) -> Awaitable:
    return _answer_empty(
        conn, req, _repository_control(conn.plane.repository_load, model, req.body)
    )


def _repository_unload(conn: _Connection, req: _Request, model: str) -> Awaitable:
    return _answer_empty(
        conn, req, _repository_control(conn.plane.repository_unload, model, req.body)
    )


def _logging(conn: _Connection, req: _Request) -> Awaitable:
    """GET reads the logging settings, POST updates them (every process, at once)."""
    update = (req.body or b"{}") if req.method == b"POST" else b""
    return _answer_json(conn, req, conn.plane.log_settings(update), control.log_settings_json)


def _trace_setting(conn: _Connection, req: _Request, model: str) -> Awaitable:
    """GET reads a model's (or the global) trace settings, POST updates them."""
    update = (req.body or b"{}") if req.method == b"POST" else b""
    return _answer_json(
        conn, req, conn.plane.trace_setting(model, update), control.trace_settings_json
    )


def _unsupported(conn: _Connection, req: _Request, message: str) -> None:
    conn._answer_error(req, unsupported(message))


def infer(conn: _Connection, req: _Request, model: str, version: str) -> None:
    """Decode, start, answer when the call resolves (``_infer_done``): all in the
    parser's callback and the call's done callback, no task, no coroutine
    (docs/architecture.md, "Less Python per request"). The call owns the body block from
    here on; ``_infer_done`` or a refusal here closes it."""
    plane = conn.plane
    call = plane.call(req.block)
    req.block = None
    if plane.tracing:  # its receipt's stamps, for a trace: _infer_done reports the send
        call.proto = getattr(req, "received", None)
    try:
        header_length = codec.parse_header_length(req.header_length)
        body = call.body.view if call.body is not None else req.body
        if header_length == 0:
            _infer_raw(conn, req, call, model, version, body)
            return
        inference = codec.decode_infer_request(body, header_length, model, version, conn.memo)
        if conn.forward is not None and req.forwarded:
            forward_headers(inference, req.forwarded)
        plane.start(call, inference)
    except Exception as exc:
        call.close()
        conn._answer_error(req, exc)
        return
    conn.task = call
    call.add_done_callback(functools.partial(_infer_done, conn, req, call))


def _infer_raw(
    conn: _Connection, req: _Request, call: InferCall, model: str, version: str, body: Any
) -> None:
    """A raw binary request (``Inference-Header-Content-Length: 0``): its input's
    metadata come from the model's configuration, fetched first; ``_infer_done``
    answers as for any request (off the hot path: only such requests pay the fetch)."""
    plane = conn.plane
    inference = InferenceRequest(model, version, "", [], [], {}, True)
    if conn.forward is not None and req.forwarded:
        forward_headers(inference, req.forwarded)

    async def run() -> InferenceResult:
        config = await plane.model_config(model, version)
        inference.inputs = codec.decode_raw_request(body, config.json, model, version).inputs
        return await plane.start(call, inference)

    conn.task = task = conn.loop.create_task(run())
    task.add_done_callback(functools.partial(_infer_done, conn, req, call))


def _infer_done(conn: _Connection, req: _Request, call: InferCall, pending: asyncio.Future) -> None:
    """Encode the call's result (or its error) and close the call, unless the response
    streams: then the streaming task closes it once written."""
    if pending.cancelled():  # the connection is gone
        call.close()
        return
    conn.task = None
    streamed = False
    # A traced call's HTTP_SEND_START (its record waits for the send: DataPlane.trace_sent)
    sending = time.time_ns() if call.traced is not None else 0
    try:
        streamed = _answer_infer(conn, req, call, pending.result(), sending)
    except Exception as exc:
        conn._answer_error(req, exc)
    finally:
        if not streamed:
            if sending:
                conn.plane.trace_sent(call, "HTTP", sending)
            call.close()
    if conn.task is None:
        conn._next()


def _answer_infer(
    conn: _Connection, req: _Request, call: InferCall, result: InferenceResult, sending: int = 0
) -> bool:
    """Write the response; True when a task streams it (and closes the call after, and
    reports a traced call's send begun at ``sending``, when not 0)."""
    inference = call.request
    parts, json_length = codec.encode_infer_response_parts(result, inference, conn.memo)
    if json_length is None:
        content_type, headers = JSON, b""
    else:
        content_type = OCTETS
        headers = b"%s: %d\r\n" % (HEADER_LENGTH, json_length)
    if len(parts) == 1:
        conn._reply(req, 200, parts[0], content_type, headers)
        return False
    size = sum(p.nbytes if type(p) is memoryview else len(p) for p in parts)
    if size < codec.STREAM_RESPONSE_BYTES:
        conn._reply(req, 200, b"".join(parts), content_type, headers)
        return False
    # Large outputs go out from where they are (shared memory), not joined.
    conn.task = conn.loop.create_task(
        conn._run(req, _stream_result(conn, req, call, parts, size, content_type, headers, sending))
    )
    return True


async def _stream_result(
    conn: _Connection,
    req: _Request,
    call: InferCall,
    parts: list,
    size: int,
    content_type: bytes,
    headers: bytes,
    sending: int,
) -> None:
    try:
        await conn._send_parts(req, parts, size, content_type, headers)
    finally:
        if sending:
            conn.plane.trace_sent(call, "HTTP", sending)
        call.close()


def _shm_status(conn: _Connection, req: _Request, cuda: bool, name: str) -> Awaitable:
    return _answer_json(conn, req, conn.plane.shm_status(cuda, name), control.shm_status_any_json)


async def _shm_register_call(plane: DataPlane, cuda: bool, name: str, body: bytes) -> None:
    try:
        args = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid_arg(f"failed to parse the registration JSON: {exc}") from None
    if not isinstance(args, dict):
        raise invalid_arg("the registration body must be a JSON object")
    await plane.shm_register(cuda, name, args)


def _shm_register(conn: _Connection, req: _Request, cuda: bool, name: str) -> Awaitable:
    return _answer_empty(conn, req, _shm_register_call(conn.plane, cuda, name, req.body))


def _shm_unregister(conn: _Connection, req: _Request, cuda: bool, name: str) -> Awaitable:
    return _answer_empty(conn, req, conn.plane.shm_unregister(cuda, name))


async def _generate(conn: _Connection, req: _Request, model: str, version: str) -> None:
    body = await generate.generate_body(conn.plane, model, version, req.body)
    conn._reply(req, 200, body, JSON, b"")


async def _generate_stream(conn: _Connection, req: _Request, model: str, version: str) -> None:
    """The request's responses as Server-Sent Events, each as it comes; a refusal before
    the first is an HTTP error as for any route (``_run``), an error after it an event."""
    events = generate.responses(conn.plane, model, version, req.body)
    try:
        item = await anext(events, None)
        if isinstance(item, ServerError):
            raise item
        conn._begin_chunked(req, EVENT_STREAM)
        while item is not None:
            error = isinstance(item, ServerError)
            payload = generate.error_event(item) if error else item  # type: ignore[arg-type]
            await conn._write_chunk(req, generate.event(payload))  # type: ignore[arg-type]
            item = None if error else await anext(events, None)
        conn._end_chunked(req)
    finally:
        await events.aclose()


SYNC = frozenset({_live, _server_metadata, _unsupported, infer})
# routes.py's operations -> this transport's handlers.
_HANDLERS: dict[str, Callable] = {
    routes.LIVE: _live,
    routes.READY: _ready,
    routes.SERVER_METADATA: _server_metadata,
    routes.MODEL_METADATA: _model_metadata,
    routes.MODEL_READY: _model_ready,
    routes.MODEL_CONFIG: _model_config,
    routes.INFER: infer,
    routes.REPOSITORY_INDEX: _repository_index,
    routes.STATISTICS: _statistics,
    routes.REPOSITORY_LOAD: _repository_load,
    routes.REPOSITORY_UNLOAD: _repository_unload,
    routes.SHM_STATUS: _shm_status,
    routes.SHM_REGISTER: _shm_register,
    routes.SHM_UNREGISTER: _shm_unregister,
    routes.LOGGING: _logging,
    routes.TRACE_SETTING: _trace_setting,
    routes.UNSUPPORTED: _unsupported,
    routes.GENERATE: _generate,
    routes.GENERATE_STREAM: _generate_stream,
}


def route(method: bytes, path: bytes) -> tuple[Callable, tuple] | tuple[int, bytes, bytes, bytes]:
    """(handler, its arguments) for a request, or the reply for a path that matches no
    route (404) or a route another method serves (405, with ``Allow``): routes.match."""
    found = routes.match(method, path)
    if type(found) is routes.Miss:
        allow = b"Allow: %s\r\n" % found.allow.encode() if found.allow else b""
        return found.status, found.body, JSON, allow
    return _HANDLERS[found.op], found.args  # type: ignore[union-attr]
