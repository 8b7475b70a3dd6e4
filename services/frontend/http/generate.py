"""Triton's generate extension: ``POST /v2/models/{m}[/versions/{v}]/generate`` and
``/generate_stream``, for both HTTP transports (lean.py / lean_ops.py and app.py).

The request is one JSON object (docs/compatibility.md, "The generate extension"): each
field that names an input of the model becomes that input (a string, number or boolean
is a one-element tensor, a list of them a 1-D tensor, with a batch dimension of 1 when
the model batches; the datatype is the input's own), every other field and each member
of ``parameters`` becomes a request parameter (a string, number or boolean). A response
is one JSON object: ``model_name``, ``model_version``, then each output by name, its one
value alone or its values as a list (BYTES as text).

``/generate`` answers exactly one response (``generate_body``); ``/generate_stream``
writes each response of the request, a decoupled model's included, as a Server-Sent
Event ``data: {...}`` as it comes (``responses``), an error once the events began as
``data: {"error": "..."}``. Both go through the request path every inference takes
(a ``StreamCall``, which a decoupled model also answers); the request is decoded by the
same codec as ``/infer`` once mapped, so it is checked the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import orjson

from despina.common import dtypes
from despina.common.errors import ServerError, internal, invalid_arg
from despina.services.frontend.call import StreamCall, Unread
from despina.services.frontend.http import codec

if TYPE_CHECKING:
    from despina.services.frontend.dataplane import DataPlane
    from despina.services.frontend.inference import InferenceRequest, InferenceResult

# /generate_stream's content type, as Triton sends it.
EVENT_STREAM = "text/event-stream; charset=utf-8"

_SCALARS = (str, int, float, bool)
_END = object()  # the call is over (queued after its responses)


def decode_request(body: bytes, config_json: bytes, model: str, version: str) -> InferenceRequest:
    """The inference request a generate request's JSON ``body`` maps to, given the
    model's configuration (``/config``'s JSON). Raises INVALID_ARG saying what to fix."""
    try:
        fields = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise invalid_arg(f"failed to parse the generate request JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise invalid_arg("the generate request must be a JSON object")
    try:
        config = orjson.loads(config_json)
        specs = {str(spec.get("name")): spec for spec in config.get("input") or []}
        batching = int(config.get("max_batch_size") or 0) != 0
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        raise internal(f"unreadable configuration of model '{model}'") from None
    given = fields.pop("parameters", None)
    if given is None:
        given = {}
    elif not isinstance(given, dict):
        raise invalid_arg("the generate request's 'parameters' must be a JSON object")
    inputs = []
    parameters: dict[str, object] = {}
    for name, value in fields.items():
        spec = specs.get(name)
        if spec is None:
            parameters[name] = _parameter(name, value)
            continue
        data = value if isinstance(value, list) else [value]
        if not all(isinstance(item, _SCALARS) for item in data):
            raise invalid_arg(
                f"generate request field '{name}' (an input of model '{model}') must be a "
                "string, number or boolean, or a list of them"
            )
        shape = [1, len(data)] if batching else [len(data)]
        datatype = dtypes.from_config_type(str(spec.get("data_type", "")))
        inputs.append({"name": name, "datatype": datatype, "shape": shape, "data": data})
    for name, value in given.items():
        parameters[name] = _parameter(name, value)
    parameters.pop("binary_data_output", None)  # the answer is JSON, whatever is asked
    request = orjson.dumps({"inputs": inputs, "parameters": parameters})
    inference = codec.decode_infer_request(request, None, model, version)
    inference.binary_output = False
    return inference


def _parameter(name: str, value: object) -> object:
    if not isinstance(value, _SCALARS):
        raise invalid_arg(
            f"generate request parameter '{name}' must be a string, number or boolean "
            "(a field that is no input of the model is a parameter)"
        )
    return value


def encode_response(result: InferenceResult, request: InferenceRequest) -> bytes:
    """One response as the generate extension writes it. Raises INTERNAL for an output
    that has no JSON form (BYTES that are not UTF-8 text)."""
    parts, binary = codec.encode_infer_response_parts(result, request)
    if binary is not None:  # an output kept binary: BYTES that are not UTF-8
        raise internal(
            f"an output of model '{result.model}' is BYTES that are not UTF-8 text: it has "
            "no generate response form"
        )
    doc = orjson.loads(parts[0])
    answer: dict[str, object] = {
        "model_name": doc["model_name"],
        "model_version": doc["model_version"],
    }
    for output in doc["outputs"]:
        data = output.get("data", [])
        answer[output["name"]] = data[0] if len(data) == 1 else data
    return orjson.dumps(answer)


def error_event(exc: ServerError) -> bytes:
    return orjson.dumps({"error": exc.message})


def event(payload: bytes) -> bytes:
    """One Server-Sent Event carrying ``payload`` (JSON: one line)."""
    return b"data: " + payload + b"\n\n"


async def responses(
    plane: DataPlane, model: str, version: str, body: bytes
) -> AsyncIterator[bytes | ServerError]:
    """Start the generate request ``body`` and yield each of its responses, encoded, as
    it comes, or the error that ended it (a ``ServerError``, then nothing more). Raises
    before the first yield when the request is refused before it runs (unknown model,
    a field that does not map): the transport then answers an HTTP error. Closing the
    iterator early cancels the request."""
    config = await plane.model_config(model, version)
    inference = decode_request(body, config.json, model, version)
    queue: asyncio.Queue = asyncio.Queue()
    unread = Unread()

    def on_response(call: StreamCall, response: object) -> None:
        if unread.over:
            return  # cancelled for its unread responses: the rest is dropped
        if type(response) is ServerError:
            queue.put_nowait(response)
            return
        try:
            encoded = encode_response(response, inference)  # type: ignore[arg-type]
        except ServerError as exc:
            queue.put_nowait(exc)
            return
        queue.put_nowait(encoded)
        if unread.queued(len(encoded)):
            queue.put_nowait(unread.error())
            call.cancel()

    call = StreamCall(plane.client, on_response)
    try:
        plane.start(call, inference)
        call.add_done_callback(lambda _: queue.put_nowait(_END))
        while True:
            item = await queue.get()
            if type(item) is bytes:
                unread.written(len(item))
                yield item
                continue
            if item is not _END:
                yield item
                if unread.over:  # the cancellation's error: nothing follows
                    return
                continue
            if call.cancelled():
                return
            exc = call.exception()
            if exc is not None:
                if not isinstance(exc, ServerError):
                    exc = internal(f"{type(exc).__name__}: {exc}")
                yield exc
                return
            if not call.empty_final:
                try:
                    yield encode_response(call.result(), inference)
                except ServerError as err:
                    yield err
            return
    finally:
        if not call.done():
            call.cancel()
        call.close()


async def generate_body(plane: DataPlane, model: str, version: str, body: bytes) -> bytes:
    """``/generate``'s answer: the request's one response. Raises its error, or
    INVALID_ARG when the model answered with more than one response (or none)."""
    answers: list[bytes] = []
    async for item in responses(plane, model, version, body):
        if isinstance(item, ServerError):
            raise item
        answers.append(item)
    if len(answers) != 1:
        raise invalid_arg(
            f"model '{model}' sent {len(answers)} responses to a generate request, which "
            "answers exactly one: use generate_stream"
        )
    return answers[0]
