"""Triton's ``inference.GRPCInferenceService``: thin handlers over the data plane.

Each handler converts the protobuf request with ``converters``, calls one ``DataPlane``
method (the same single path to the scheduler the HTTP frontend takes) and converts
what comes back. A ``ServerError`` ends the call with the status ``GRPC_STATUS`` maps
its code to and its message as the details, the same message the HTTP frontend sends.
The trace and log settings (``TraceSetting``, ``LogSettings``) are held by the scheduler
(services/scheduler/settings_store.py), as every other control answer.

``ModelInfer`` and ``ModelStreamInfer`` take and return message bytes (``server``
registers them without a protobuf (de)serializer): ``converters`` parses and serializes
them, keeping large tensors out of protobuf's copies.

One servicer serves every call of its frontend process; it keeps no per-call state
outside the calls' own coroutines (its ``RequestMemo`` is the last request's fields,
decoded, for the next call that repeats them).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import NamedTuple, NoReturn, cast

from despina.common.errors import Code, ServerError
from despina.common.protos import service_pb2 as pb
from despina.services.frontend import control
from despina.services.frontend.call import InferCall, StreamCall, Unread
from despina.services.frontend.dataplane import DataPlane
from despina.services.frontend.grpc import converters
from despina.services.frontend.grpc.errors import Status, status_of
from despina.services.frontend.inference import RequestMemo

log = logging.getLogger("despina.frontend")

# Requests of one stream that may be in flight or answered but not yet sent at once (the
# transport takes a response only once the last one is sent: h2server waits for the
# client's window, grpc.aio for its own flow control). Past it the stream stops reading
# requests, and the transport holds the client back: a client that does not read its
# responses cannot make the server run and buffer more.
STREAM_MAX_INFLIGHT = 64


async def _fail(context, exc: ServerError) -> NoReturn:
    """End the call with ``exc``'s status and message (``abort`` raises to do so)."""
    await context.abort(*status_of(exc))
    raise AssertionError("unreachable: abort raises")


async def _unimplemented(context, message: str) -> NoReturn:
    await context.abort(Status.UNIMPLEMENTED, message)
    raise AssertionError("unreachable: abort raises")


class _TracedSend(NamedTuple):
    """A traced stream request's last response, queued for writing: its trace is filed
    once it was written (``DataPlane.trace_sent``, sending: when it began to be encoded)."""

    response: bytes
    call: InferCall
    sending: int


class InferenceServicer:
    """Every method of ``inference.GRPCInferenceService``, by its name. ``context`` is
    the transport's call context: ``abort(status, details)`` with a ``Status``."""

    def __init__(
        self, plane: DataPlane, forward: re.Pattern[str] | None = None, memo: bool = True
    ) -> None:
        self.plane = plane
        # --grpc-header-forward-pattern (inference.compile_forward_pattern): request
        # metadata whose key matches reach the model as parameters; with it, ModelInfer
        # runs as a coroutine (it reads the call's metadata), see method_handlers
        self.forward = forward
        self._server_metadata = control.server_metadata_pb(plane.metadata)
        # Request memos (RequestMemo) are per connection: the transport keeps one from
        # ``new_memo`` and hands it to ``start_model_infer``; False: the speed path is off.
        self.memo_enabled = memo

    # --- health and metadata --------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.plane.live())

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await self.plane.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(
            ready=await self.plane.model_ready(request.name, request.version)
        )

    async def ServerMetadata(self, request, context):
        return self._server_metadata

    async def ModelMetadata(self, request, context):
        try:
            body = await self.plane.model_metadata(request.name, request.version)
        except ServerError as exc:
            await _fail(context, exc)
        return control.model_metadata_pb(body)

    async def ModelConfig(self, request, context):
        try:
            body = await self.plane.model_config(request.name, request.version)
        except ServerError as exc:
            await _fail(context, exc)
        return control.model_config_pb(body)

    async def RepositoryIndex(self, request, context):
        try:
            body = await self.plane.repository_index()
        except ServerError as exc:
            await _fail(context, exc)
        return control.repository_index_pb(body, request.ready)

    async def RepositoryModelLoad(self, request, context):
        try:
            await self.plane.repository_load(request.model_name, _repository_parameters(request))
        except ServerError as exc:
            await _fail(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        try:
            await self.plane.repository_unload(request.model_name, _repository_parameters(request))
        except ServerError as exc:
            await _fail(context, exc)
        return pb.RepositoryModelUnloadResponse()

    # --- inference ------------------------------------------------------------------------

    def new_memo(self) -> RequestMemo | None:
        """A connection's request memo, or None when memos are off."""
        return RequestMemo() if self.memo_enabled else None

    def start_model_infer(
        self,
        request: bytes,
        answer: Callable[[bytes | None, int, str], None],
        memo: RequestMemo | None = None,
        received: list | None = None,
    ) -> asyncio.Future | None:
        """``ModelInfer`` without a coroutine, for a transport that answers from a
        callback (``h2server``): decode and start now, encode in the call's done callback.
        Returns the call (cancel it to abandon it), or None when it has answered already.
        ``answer(response, Status.OK, "")`` or ``answer(None, status, message)``.
        ``memo``: the connection's (``new_memo``), or None to decode every request.
        ``received``: the trace stamps of its receipt (GRPC_WAITREAD_*), given while
        tracing; the call's trace then waits for its answer's send (GRPC_SEND_*)."""
        plane = self.plane
        call = plane.call()
        call.proto = received
        try:
            plane.start(call, converters.decode_message(request, memo))
        except ServerError as exc:
            call.close()
            answer(None, *status_of(exc))
            return None

        def done(call: InferCall) -> None:
            if call.cancelled():  # the call ended (deadline, reset)
                call.close()
                return
            # A traced call's GRPC_SEND_START (its record waits: DataPlane.trace_sent)
            sending = time.time_ns() if call.traced is not None else 0
            try:
                response = converters.serialize_infer_response(call.result(), call.request, memo)
            except ServerError as exc:
                call.close()
                answer(None, *status_of(exc))
                if sending:
                    plane.trace_sent(call, "GRPC", sending)
                return
            try:  # the response leaves first: closing (counting it) is off its path
                answer(response, Status.OK, "")
            finally:
                if sending:
                    plane.trace_sent(call, "GRPC", sending)
                call.close()

        call.add_done_callback(done)
        return call

    async def ModelInfer(self, request: bytes, context) -> bytes:
        plane = self.plane
        call = plane.call()
        try:
            # No memo: a grpc.aio call does not know its connection (docs/architecture.md#speed-paths)
            inference = converters.decode_message(request)
            if self.forward is not None:
                converters.forward_metadata(inference, context, self.forward)
            result = await plane.infer(call, inference)
            return converters.serialize_infer_response(result, inference)
        except ServerError as exc:
            await _fail(context, exc)
        finally:
            call.close()

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[bytes], context
    ) -> AsyncIterator[bytes]:
        """Bidirectional stream: every request is started as soon as it is read, and
        its response is written when it is ready, in completion order, carrying the
        request's id. A failed request becomes a response with ``error_message`` set;
        the stream stays open, unless the client sent the header
        ``triton_grpc_error: true`` (Triton's mode of that name): then the first failed
        request ends the stream with its gRPC status and message, and the requests
        still in flight are cancelled. The stream ends once the client has half-closed
        it and every response is written. At most STREAM_MAX_INFLIGHT requests are in flight or
        unsent. However the stream ends (a client that resets it or goes away, a
        deadline), closing this generator cancels every request in flight, which cancels
        it downstream.

        A decoupled model's request gets each of its responses written as it arrives
        (``StreamCall.on_response``), in the order the model sent them; with
        ``triton_enable_empty_final_response`` each carries ``triton_final_response``
        (false until the last), and a FINAL flag sent alone is written as a response
        without outputs; without it, nothing is written for that flag."""
        plane = self.plane
        loop = asyncio.get_running_loop()
        # A ServerError in the queue ends the stream with its status (triton_grpc_error).
        out: asyncio.Queue[bytes | tuple[bytes] | ServerError | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_MAX_INFLIGHT)
        inflight: set[InferCall] = set()
        reading = True
        grpc_error = converters.wants_grpc_error(context.invocation_metadata())

        def failed(message: str, request: pb.ModelInferRequest, code: Code) -> None:
            if grpc_error:
                out.put_nowait(ServerError(code, message))
            else:
                out.put_nowait(converters.stream_error(message, request).SerializeToString())

        unread = Unread()  # decoupled responses queued, not yet written

        def part(request: pb.ModelInferRequest, final_flag: bool, call: StreamCall, response):
            """A decoupled model's response before its last (its request's slot stays
            held): written, or its error (which ends the stream in triton_grpc_error mode).
            Past call.MAX_UNREAD_BYTES of them unwritten (a client that does not read) the
            stream ends UNAVAILABLE and its requests are cancelled."""
            if unread.over:
                return
            try:
                if type(response) is ServerError:
                    raise response
                data = converters.serialize_stream_response(
                    response, call.request, final_flag, False
                )
            except ServerError as err:
                if grpc_error:
                    out.put_nowait(err)
                    return
                data = converters.stream_error(err.message, request).SerializeToString()
            out.put_nowait((data,))
            if unread.queued(len(data)):
                out.put_nowait(unread.error())
                for task in list(inflight):
                    task.cancel()

        def finish(request: pb.ModelInferRequest, final_flag: bool, call: InferCall) -> None:
            inflight.discard(call)
            traced = call.traced is not None  # its trace waits for the send (GRPC_SEND_*)
            try:
                if call.cancelled():
                    return
                if call.empty_final and not final_flag:  # type: ignore[attr-defined]
                    slots.release()  # nothing to write for it
                elif traced:
                    sending = time.time_ns()
                    response = converters.serialize_stream_response(
                        call.result(), call.request, final_flag
                    )
                    out.put_nowait(_TracedSend(response, call, sending))
                    traced = False  # reported once written
                else:
                    out.put_nowait(
                        converters.serialize_stream_response(
                            call.result(), call.request, final_flag
                        )
                    )
            except ServerError as err:
                failed(err.message, request, err.code)
            except Exception as err:
                log.exception("stream request %r failed", request.id)
                failed(f"internal error: {err}", request, Code.INTERNAL)
            finally:
                if traced:  # no answer of its own written: filed without send stamps
                    plane.trace_sent(call, "GRPC", 0)
                call.close()
            if not reading and not inflight:
                out.put_nowait(None)

        async def read() -> None:
            nonlocal reading
            messages = aiter(request_iterator)
            try:
                while True:
                    # While tracing: GRPC_WAITREAD_START, the wait for its message
                    waiting = time.time_ns() if plane.tracing else 0
                    try:
                        message = await anext(messages)
                    except StopAsyncIteration:
                        break
                    await slots.acquire()
                    # Bytes that are no ModelInferRequest end the stream (INVALID_ARGUMENT).
                    request, raw = converters.parse_infer_request(message)
                    final_flag = converters.wants_final_flag(request)
                    call = StreamCall(plane.client, partial(part, request, final_flag))
                    if waiting:
                        call.proto = [
                            ("GRPC_WAITREAD_START", waiting),
                            ("GRPC_WAITREAD_END", time.time_ns()),
                        ]
                    try:
                        inference = converters.decode_infer_request(request, raw)
                        if self.forward is not None:
                            converters.forward_metadata(inference, context, self.forward)
                        plane.start(call, inference)
                    except ServerError as exc:
                        call.close()
                        failed(exc.message, request, exc.code)
                        continue
                    inflight.add(call)
                    call.add_done_callback(partial(finish, request, final_flag))
            finally:
                reading = False
                if not inflight:
                    out.put_nowait(None)

        reader = loop.create_task(read())
        try:
            while True:
                response = await out.get()
                if response is None:
                    break
                kind = type(response)
                if kind is not bytes:
                    if kind is ServerError:
                        await _fail(context, response)  # type: ignore[arg-type]
                    if kind is _TracedSend:  # written: its trace gets GRPC_SEND_*, filed
                        sent = cast(_TracedSend, response)
                        yield sent.response
                        plane.trace_sent(sent.call, "GRPC", sent.sending)
                        slots.release()
                        continue
                    # A decoupled model's response before its last, a 1-tuple: the
                    # request's slot stays held until its last.
                    data = cast(tuple, response)[0]
                    yield data
                    unread.written(len(data))
                    continue
                yield cast(bytes, response)
                slots.release()
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                exc = reader.exception()
                if isinstance(exc, ServerError):
                    await _fail(context, exc)
                raise exc  # type: ignore[misc]
        finally:
            reader.cancel()
            for task in list(inflight):
                task.cancel()

    # --- shared memory (the registry lives in the scheduler, shared by all frontends) -------

    async def SystemSharedMemoryStatus(self, request, context):
        try:
            body = await self.plane.shm_status(False, request.name)
        except ServerError as exc:
            await _fail(context, exc)
        return control.shm_status_any_pb(body)

    async def SystemSharedMemoryRegister(self, request, context):
        args = {"key": request.key, "offset": request.offset, "byte_size": request.byte_size}
        try:
            await self.plane.shm_register(False, request.name, args)
        except ServerError as exc:
            await _fail(context, exc)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request, context):
        try:
            await self.plane.shm_unregister(False, request.name)
        except ServerError as exc:
            await _fail(context, exc)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request, context):
        try:
            body = await self.plane.shm_status(True, request.name)
        except ServerError as exc:
            await _fail(context, exc)
        return control.shm_status_any_pb(body)

    async def CudaSharedMemoryRegister(self, request, context):
        try:
            await self.plane.shm_register(
                True, request.name, converters.cuda_shm_register_args(request)
            )
        except ServerError as exc:
            await _fail(context, exc)
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(self, request, context):
        try:
            await self.plane.shm_unregister(True, request.name)
        except ServerError as exc:
            await _fail(context, exc)
        return pb.CudaSharedMemoryUnregisterResponse()

    # --- not built yet ----------------------------------------------------------------------

    async def ModelStatistics(self, request, context):
        try:
            record = await self.plane.statistics(request.name, request.version)
        except ServerError as exc:
            await _fail(context, exc)
        return control.statistics_pb(record)

    async def TraceSetting(self, request, context):
        try:
            update = control.trace_settings_update(request) if request.settings else b""
            record = await self.plane.trace_setting(request.model_name, update)
        except ServerError as exc:
            await _fail(context, exc)
        return control.trace_settings_pb(record)

    async def LogSettings(self, request, context):
        try:
            update = control.log_settings_update(request) if request.settings else b""
            record = await self.plane.log_settings(update)
        except ServerError as exc:
            await _fail(context, exc)
        return control.log_settings_pb(record)


def _repository_parameters(request) -> dict:
    """A load's or unload's ``parameters`` map as the HTTP extension's JSON spells them
    (``DataPlane.repository_load``): file contents (``bytes_param``) as base64 text."""
    parameters: dict = {}
    for key, param in request.parameters.items():
        which = param.WhichOneof("parameter_choice")
        value = getattr(param, which) if which else None
        if which == "bytes_param":
            value = base64.b64encode(param.bytes_param).decode()
        parameters[key] = value
    return parameters
