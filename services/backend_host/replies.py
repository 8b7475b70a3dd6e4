"""A backend host's replies: results encoded as ``InferReply`` records, sent straight to
the frontends that asked (one message per frontend per wake), completions told to the
scheduler, and the host's output-arena blocks lent with them released again.

Every output block this host's arena lends a frontend is released here, and only here:
when the frontend's ``Release`` names it, when its reply could not be delivered, or when
the frontend's stream closes (``Replies.release``). A block taken for a reply that then
fails to encode is released by ``encode_response`` before it returns.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

import msgspec
import numpy as np

from despina.common import busypoll, dtypes, outbox, streams
from despina.common import messages as m
from despina.common.cuda import CudaMapper
from despina.common.errors import Code, ServerError, invalid_arg
from despina.common.shm.arena import ShmArena, ShmMapper
from despina.services.backend_host.backend import DEFERRED, ExecResponse

log = logging.getLogger("despina.backend_host")

# Outputs up to this size are copied into bytes rather than viewed in place: see
# docs/architecture.md#copy-small-outputs.
COPY_BELOW = 16 * 1024


class Replies:
    """Encodes the results of executions and sends them: replies per frontend stream,
    completions (``sid``s) and undelivered replies to the scheduler, in one flush per
    wake of the ``outbox``. Owns the reply streams to the frontends and the record of
    which arena blocks each frontend holds. Loop only."""

    def __init__(
        self,
        host_id: str,
        mapper: ShmMapper,
        cuda: CudaMapper,
        arena: ShmArena,
        instances: dict,
        to_scheduler: Callable[[msgspec.Struct], None],
        on_frontend_burst: Callable[[streams.FramedProtocol, list[list]], None],
        idle: Callable[[], bool],
        arena_threshold: int,
    ) -> None:
        self.host_id = host_id
        self.mapper = mapper
        self.cuda = cuda
        self.arena = arena
        self.arena_threshold = arena_threshold  # outputs this large: into the arena
        self._instances = instances  # the executor's, read for classification
        self._to_scheduler = to_scheduler
        self._on_frontend_burst = on_frontend_burst
        self._idle = idle
        self._encode = m.encoder().encode
        self.outbox: outbox.Outbox | None = None
        self.streams: dict[str, streams.LazyStream] = {}
        # Arena blocks sent to each frontend and not released yet: released if it goes away.
        self._lent: dict[str, set[tuple[str, int]]] = {}
        self._undelivered: list[tuple[str, int, str, str]] = []
        self.poll: busypoll.BusyPoll | None = None
        # A decoupled instance's requests that have not sent their final response yet:
        # (reply_to, rid) -> its response sender (whose ``cancelled`` a Cancel sets).
        self.streaming: dict[tuple[str, int], object] = {}

    def start(self, busy_poll_s: float, waiting: Callable[[], bool], burst: bool = True) -> None:
        """On the loop, before the first reply: the outbox (``burst`` False: each reply
        sent at once), and the busy poll that keeps the loop turning while ``waiting``
        says nothing runs on a thread."""
        self.outbox = outbox.Outbox(self._flush, burst=burst)
        self.put = self.outbox.put
        self.poll = busypoll.BusyPoll(busy_poll_s, waiting)

    def answer(
        self,
        execution: m.Execution,
        responses: list[ExecResponse] | None,
        batch_error: ServerError | None,
    ) -> None:
        """Queue a reply for every request of ``execution``: a request whose outputs
        cannot be encoded gets its error, the others their outputs; then the completion
        of its scheduled requests (a direct execution has none). Raises nothing."""
        put = self.put
        for i, req in enumerate(execution.requests):
            try:
                if batch_error is not None:
                    reply = error_reply(req, batch_error.code.value, batch_error.message)
                else:
                    assert responses is not None
                    if req.classification:
                        li = self._instances.get(
                            (execution.model, execution.version, execution.instance)
                        )
                        if li is not None:
                            li.classify(req, responses[i])
                    reply = encode_response(
                        req,
                        responses[i],
                        self.mapper,
                        self.cuda,
                        self.arena if _shares_shm(req.reply_to) else None,
                        self.arena_threshold,
                    )
            except Exception as exc:
                log.error("encoding the reply to %d failed:\n%s", req.rid, traceback.format_exc())
                reply = error_reply(req, Code.INTERNAL.value, f"{type(exc).__name__}: {exc}")
            put(req.reply_to, reply)
        if not execution.direct:
            self._complete(execution)

    def _complete(self, execution: m.Execution) -> None:
        """Queue the completion of a scheduled execution's requests for the scheduler."""
        sids = [r.sid for r in execution.requests]
        if sids:
            self.put(None, (execution.model, execution.version, execution.instance, sids))

    def answer_decoupled(
        self,
        execution: m.Execution,
        responses: list[ExecResponse] | None,
        batch_error: ServerError | None,
    ) -> None:
        """``answer`` for a decoupled instance: a request answered through its response
        sender (``DEFERRED``) gets no reply here, the others (refused, failed) theirs; a
        failed execution ends every request's stream with its error. Raises nothing."""
        if responses is None:
            for req in execution.requests:
                self.streaming.pop((req.reply_to, req.rid), None)
            return self.answer(execution, None, batch_error)
        for req, response in zip(execution.requests, responses):
            if response is not DEFERRED:
                self.answer(
                    m.Execution(
                        execution.model, execution.version, execution.instance, [req], True
                    ),
                    [response],
                    None,
                )
        if not execution.direct:
            self._complete(execution)

    def send_part(self, req: m.Infer, response: ExecResponse | None, final: bool) -> None:
        """Queue one response of a decoupled request (its response sender's ``send``,
        on the loop, in the order sent): ``response`` None is an empty final. A stream's
        outputs travel inline (no arena block lent per response). Raises nothing."""
        if response is None:
            reply: m.InferReply = m.InferReply(
                req.rid, req.model, req.version, [], None, req.trace, m.PART_EMPTY_FINAL
            )
            buffers: list = []
        else:
            reply, buffers = encode_response(req, response, self.mapper, self.cuda)
            reply.part = m.PART_FINAL if final else m.PART_MORE
        if final:
            self.streaming.pop((req.reply_to, req.rid), None)
        self.put(req.reply_to, (reply, buffers))

    def _flush(self, pending: dict) -> None:
        done = pending.pop(None, None)
        for endpoint, replies in pending.items():
            frames = outbox.FrameList()
            records = []
            blocks: list[tuple[str, int]] = []
            for reply, buffers in replies:
                frames.inline(reply.outputs, buffers)
                records.append(reply)
                if None in buffers:  # outputs in shared memory: this arena's are lent
                    blocks.extend(
                        (t.ref.key, t.ref.offset)
                        for t in reply.outputs
                        if isinstance(t.ref, m.Shm) and t.ref.key.startswith(self.arena.prefix)
                    )
            if blocks:
                self._lent.setdefault(endpoint, set()).update(blocks)
            self.stream(endpoint).send(
                frames.finish(self._encode(m.ReplyBatch(records))), (records, endpoint, blocks)
            )
        if done or self._undelivered:
            undelivered, self._undelivered = self._undelivered, []
            self._to_scheduler(m.Completion(self.host_id, done or [], undelivered))
        replies = sum(len(r) for r in pending.values())
        if replies <= busypoll.LIGHT_LOAD and self._idle():
            assert self.poll is not None
            self.poll.arm()

    def stream(self, endpoint: str) -> streams.LazyStream:
        """The stream to the frontend at ``endpoint`` (opened at its first use)."""
        stream = self.streams.get(endpoint)
        if stream is None:
            stream = streams.LazyStream(
                endpoint,
                self._on_frontend_burst,
                self._on_undelivered,
                on_lost=lambda _link, endpoint=endpoint: self._frontend_lost(endpoint),
            )
            self.streams[endpoint] = stream
        return stream

    def endpoint_of(self, link: streams.FramedProtocol) -> str | None:
        for endpoint, stream in self.streams.items():
            if stream.link is link:
                return endpoint
        return None

    def release(self, endpoint: str, blocks: list[tuple[str, int]]) -> None:
        """Release the arena blocks of ``blocks`` that were lent to ``endpoint`` (others
        are not its to release: ignored)."""
        lent = self._lent.get(endpoint, set())
        for block in blocks:
            if block in lent:
                lent.discard(block)
                self.arena.release(*block)

    def _frontend_lost(self, endpoint: str) -> None:
        """The frontend's stream closed: release every block it held."""
        self.release(endpoint, list(self._lent.pop(endpoint, ())))
        self.streams.pop(endpoint, None)

    def _on_undelivered(self, tags: list) -> None:
        """Replies that could not reach their frontend: the scheduler tells it instead,
        and their arena blocks are released."""
        for tag in tags:
            if tag is None:
                continue  # a HostLink the frontend did not get: it keeps using the scheduler
            records, endpoint, blocks = tag
            self._undelivered.extend((endpoint, r.rid, r.model, r.version) for r in records)
            self.release(endpoint, blocks)
        self._flush({})

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()


def _shares_shm(endpoint: str) -> bool:
    """A unix-socket peer is on this machine and sees this /dev/shm; a TCP peer may not
    (another container or machine), so its outputs travel inline."""
    return endpoint.startswith(("unix://", "ipc://"))


def error_reply(req: m.Infer, code: str, message: str) -> tuple[m.InferReply, list]:
    return m.InferReply(req.rid, req.model, req.version, [], m.Error(code, message), req.trace), []


def encode_response(
    req: m.Infer,
    response: ExecResponse,
    mapper: ShmMapper,
    cuda: CudaMapper | None = None,
    arena: ShmArena | None = None,
    arena_threshold: int = 0,
) -> tuple[m.InferReply, list]:
    """The reply record and its output buffers (None where the output is already in
    shared memory: the client's region when it asked for one, else, for large outputs,
    this host's arena, from ``arena_threshold`` bytes; either way one copy, and the
    block's owner releases it). Raises nothing: a failure is the request's error reply,
    and the arena blocks taken for it are released."""
    if response.error is not None:
        return error_reply(req, response.error.code.value, response.error.message)
    missing = [n for n in req.outputs if n not in response.outputs]
    if missing:
        return error_reply(
            req, Code.INTERNAL.value, f"the model did not produce requested output(s) {missing}"
        )
    tensors: list[m.Tensor] = []
    buffers: list = []
    wanted = req.outputs
    targets = req.output_targets
    try:
        for name, value in response.outputs.items():
            if wanted and name not in wanted:
                continue
            arr = value if type(value) is np.ndarray else np.asarray(value)
            datatype = dtypes.from_numpy(arr.dtype)
            if datatype == "BYTES":
                buf: bytes | memoryview = dtypes.serialize_bytes(arr)
            elif arr.nbytes <= COPY_BELOW:
                buf = arr.tobytes()
            else:
                buf = np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data
            shape = list(arr.shape)
            target = targets.get(name) if targets else None
            if isinstance(target, (m.Shm, m.CudaIpc)):
                size = len(buf)
                if size > target.size:
                    raise invalid_arg(
                        f"shared memory size specified with the request for output '{name}' "
                        f"({target.size} bytes) should be at least {size} bytes to hold the "
                        "results"
                    )
                if isinstance(target, m.Shm):
                    mapper.write(target.key, target.offset, buf)  # pwrite: no SIGBUS
                    ref: m.TensorRef = m.Shm(target.key, target.offset, size)
                else:
                    assert cuda is not None
                    cuda.write(target.handle, target.device_id, target.offset, buf)
                    ref = m.CudaIpc(target.handle, target.device_id, target.offset, size)
                tensors.append(m.Tensor(name, datatype, shape, ref))
                buffers.append(None)
            elif arena is not None and len(buf) >= arena_threshold:
                key, offset, view = arena.allocate(len(buf))
                view[: len(buf)] = buf
                tensors.append(m.Tensor(name, datatype, shape, m.Shm(key, offset, len(buf))))
                buffers.append(None)
            else:
                tensors.append(m.Tensor(name, datatype, shape, m.Inline(0)))
                buffers.append(buf)
    except Exception as exc:
        if arena is not None:  # blocks taken for this reply's earlier outputs
            for t in tensors:
                if isinstance(t.ref, m.Shm) and t.ref.key.startswith(arena.prefix):
                    arena.release(t.ref.key, t.ref.offset)
        if isinstance(exc, ServerError):
            return error_reply(req, exc.code.value, exc.message)
        log.error("encoding the reply to %d failed:\n%s", req.rid, traceback.format_exc())
        return error_reply(req, Code.INTERNAL.value, f"{type(exc).__name__}: {exc}")
    return m.InferReply(req.rid, req.model, req.version, tensors, None, req.trace), buffers
