"""The frontend's one client of the scheduler: requests out, replies in.

Requests go to the scheduler gathered into one ``InferBatch`` per loop iteration, over a
plain stream (``unix://`` or ``tcp://``: one thread wake-up per hop, measured ten times
cheaper than libzmq on this kind of machine) or a ZeroMQ DEALER socket (``ipc://`` or
``zmq+tcp://``). Replies come straight from the backend hosts over streams to this
frontend's reply listener (common/streams.py), and from the scheduler for requests it
refused or that died with their host. Each pending request is a future keyed by a
frontend-local id. Input tensors at or above ``inline_threshold`` bytes are written once
into this frontend's shared-memory arena and sent as ``Shm`` refs; the arena block is
released when the request's reply (or error) arrives, which is after the backend host is
done reading it.

Direct routes: for the model versions the scheduler lists in ``Routes`` (Triton's default
scheduler, or a plain dynamic batcher, which the host applies: any free instance will
do), this client checks the request against the model's signature itself and sends it
straight to the least busy instance's backend host, over the link that host opened to
the reply listener (``HostLink``). The scheduler is then off the request's path: two
processes and three wake-ups per request instead of three and five. Requests naming
client shared-memory regions still pass the scheduler, which owns the region registry.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from despina.common import busypoll, control, outbox, streams
from despina.common import messages as m
from despina.common.errors import Code, ServerError, invalid_arg, unavailable
from despina.common.shm.arena import ShmArena, ShmMapper, arena_prefix
from despina.common.validate import check_request
from despina.services.flags import INLINE_THRESHOLD
from despina.services.frontend.inference import InferenceRequest, InferenceResult, OutputTensor

if TYPE_CHECKING:
    from despina.common.transport import SocketDriver

log = logging.getLogger("despina.frontend")

QUERY_TIMEOUT_S = 10.0


class BodyBlock:
    """An arena block a request body is read into. Owned by whoever holds it until
    ``SchedulerClient.infer`` takes it (``taken``); ``SchedulerClient.drop`` frees one that
    never got that far."""

    __slots__ = ("key", "offset", "view", "address", "taken")

    def __init__(self, key: str, offset: int, view: memoryview) -> None:
        self.key = key
        self.offset = offset
        self.view = view
        self.address = np.frombuffer(view, np.uint8).ctypes.data
        self.taken = False

    def ref_of(self, data: memoryview) -> m.Shm | None:
        """The block-relative ref of ``data`` when it is a slice of this block."""
        if not isinstance(data, memoryview):
            return None
        start = np.frombuffer(data, np.uint8).ctypes.data - self.address
        if 0 <= start and start + data.nbytes <= self.view.nbytes:
            return m.Shm(self.key, self.offset + start, data.nbytes)
        return None


def zeromq_endpoint(endpoint: str) -> str | None:
    """The ZeroMQ address when ``endpoint`` asks for ZeroMQ (``ipc://path`` or
    ``zmq+tcp://host:port``); None for a stream endpoint (``unix://path``, ``tcp://...``)."""
    if endpoint.startswith("ipc://"):
        return endpoint
    if endpoint.startswith("zmq+tcp://"):
        return endpoint[4:]
    return None


class _Target:
    """One model instance a direct route may use, with this frontend's requests on it."""

    __slots__ = ("host_id", "index", "outstanding")

    def __init__(self, host_id: str, index: int, outstanding: int = 0) -> None:
        self.host_id = host_id
        self.index = index
        self.outstanding = outstanding


class _Direct:
    """A request bound for one instance over its host's link, waiting for the flush."""

    __slots__ = ("target", "wire", "buffers")

    def __init__(self, target: _Target, wire: m.Infer, buffers: list) -> None:
        self.target = target
        self.wire = wire
        self.buffers = buffers


class _Cancel:
    """A request whose client went away, waiting for the flush to its holder."""

    __slots__ = ("rid",)

    def __init__(self, rid: int) -> None:
        self.rid = rid


# The outbox key of the cancels bound for the scheduler (requests go under None).
_TO_SCHEDULER_CANCELS = object()


class _InferFuture(asyncio.Future):
    """An infer's future. Cancelling it (the client went away: a closed connection,
    RST_STREAM, a deadline) tells whoever holds the request, the scheduler or the backend
    host, so that it drops the request if it has not started; the request's entry stays
    until its reply (or CANCELLED error) comes, which frees its arena blocks."""

    __slots__ = ("_client", "_rid")

    _client: SchedulerClient
    _rid: int

    def cancel(self, msg: object = None) -> bool:
        if not super().cancel(msg):
            return False
        self._client._cancelled(self._rid)
        return True


class _StreamToScheduler:
    """The frontend's stream to the scheduler, reconnected (and hello said again) when it
    breaks. While it is down, sends fail and the callers answer UNAVAILABLE."""

    def __init__(self, endpoint: str, on_burst, on_connected, on_lost=None) -> None:
        self.endpoint = endpoint
        self._on_burst = on_burst
        self._on_connected = on_connected
        self._on_lost = on_lost
        self._link: streams.FramedProtocol | None = None
        self._task: asyncio.Task | None = None

    async def start(self, wait_s: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + wait_s
        while self._link is None:
            try:
                await self._connect()
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _connect(self) -> None:
        self._link = await streams.connect(
            self.endpoint, lambda _link, burst: self._on_burst(burst), self._lost
        )
        self._on_connected()

    def _lost(self, _link: streams.FramedProtocol) -> None:
        self._link = None
        log.error("lost the scheduler at %s; reconnecting", self.endpoint)
        if self._on_lost is not None:
            self._on_lost()
        self._task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.05
        while self._link is None:
            try:
                await self._connect()
            except OSError:
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    def send(self, frames: list) -> bool:
        return self._link is not None and self._link.send(frames)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._link is not None:
            link, self._link = self._link, None
            link._on_lost = None  # closing on purpose: no reconnect
            link.close()


def region_ref(parameters: dict, what: str) -> m.Region:
    """The client region a tensor's ``shared_memory_*`` parameters name."""
    name = parameters.get("shared_memory_region")
    size = parameters.get("shared_memory_byte_size")
    offset = parameters.get("shared_memory_offset", 0)
    if not isinstance(name, str) or not name:
        raise invalid_arg(f"'shared_memory_region' of {what} must be a region name")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise invalid_arg(
            f"'shared_memory_byte_size' must be given, as a non-negative integer, for {what} "
            f"in shared memory region '{name}'"
        )
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise invalid_arg(f"'shared_memory_offset' of {what} must be a non-negative integer")
    return m.Region(name, offset, size)


def classification_counts(request: InferenceRequest) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in request.outputs:
        k = o.parameters.get("classification")
        if k is None:
            continue
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise invalid_arg(
                f"'classification' of output '{o.name}' must be a positive integer, got {k!r}"
            )
        counts[o.name] = k
    return counts


class SchedulerClient:
    """Not thread-safe: one per frontend process, used from its loop."""

    def __init__(
        self,
        scheduler_endpoint: str,
        reply_endpoint: str,
        *,
        inline_threshold: int = INLINE_THRESHOLD,
        arena_segment_size: int = 64 * 1024 * 1024,
        busy_poll_s: float = 0.0,
    ) -> None:
        self.scheduler_endpoint = scheduler_endpoint
        self.listen_endpoint = reply_endpoint
        # What backend hosts are told to send replies to (differs behind NAT/containers).
        self.reply_endpoint = reply_endpoint
        self.inline_threshold = inline_threshold
        self.arena = ShmArena(arena_prefix("fe"), arena_segment_size)
        # rid -> (future, input arena blocks, names of outputs going to client regions,
        # the instance when it went there directly)
        self._pending: dict[
            int, tuple[asyncio.Future, list[tuple[str, int]], set[str], _Target | None]
        ] = {}
        # (model, version or "" for the default) -> (route, its instances)
        self._routes: dict[tuple[str, str], tuple[m.Route, list[_Target]]] = {}
        self._host_links: dict[str, streams.FramedProtocol] = {}  # host_id -> its link
        self.mapper = ShmMapper(capacity=16)
        self._queries: dict[int, asyncio.Future] = {}
        self._next_id = 1
        self._encode = m.encoder().encode
        self._decode = m.decoder(m.FrontendInbound).decode
        self._to_scheduler: SocketDriver | _StreamToScheduler | None = None
        self._replies: asyncio.AbstractServer | None = None
        self._outbox: outbox.Outbox | None = None
        self._busy_poll_s = busy_poll_s
        self._poll: busypoll.BusyPoll | None = None

    async def start(self) -> None:
        self._replies = await streams.serve(
            self.listen_endpoint, lambda link, burst: self._on_burst(burst, link), self._link_lost
        )
        self._outbox = outbox.Outbox(self._flush)
        # Poll while a few requests are out: their replies come within the budget.
        self._poll = busypoll.BusyPoll(self._busy_poll_s, self._lightly_loaded)
        zmq_endpoint = zeromq_endpoint(self.scheduler_endpoint)
        if zmq_endpoint is not None:
            # Imported only here: pyzmq costs every frontend ~5 MiB it would not use.
            import zmq

            from despina.common import transport

            dealer = transport.configure(transport.make_context().socket(zmq.DEALER))
            transport.secure(dealer, zmq_endpoint, server=False)
            dealer.connect(zmq_endpoint)
            self._to_scheduler = transport.SocketDriver(dealer, self._on_burst)
            self._hello()
        else:
            self._to_scheduler = _StreamToScheduler(
                self.scheduler_endpoint, self._on_burst, self._hello, self._forget_routes
            )
            await self._to_scheduler.start()

    def _hello(self) -> None:
        assert self._to_scheduler is not None
        self._to_scheduler.send(
            [self._encode(m.FrontendHello(m.PROTOCOL_VERSION, self.reply_endpoint))]
        )

    def close(self) -> None:
        for fut, *_ in self._pending.values():
            if not fut.done():
                fut.set_exception(unavailable("the frontend is shutting down"))
        self._pending.clear()
        if self._to_scheduler is not None:
            self._to_scheduler.close()
        if self._replies is not None:
            self._replies.close()
        log.info("input arena: %d block(s) in use at exit", self.arena.blocks_in_use)
        self.arena.close()

    @property
    def inflight(self) -> int:
        return len(self._pending)

    # --- requests -----------------------------------------------------------------------

    def infer(self, request: InferenceRequest) -> asyncio.Future:
        """Queue ``request``; the future resolves to an ``InferenceResult`` or raises
        ``ServerError``. Raises ServerError at once for what can be refused here."""
        rid = self._next_id
        self._next_id += 1
        tensors: list[m.Tensor] = []
        buffers: list = []
        blocks: list[tuple[str, int]] = []
        regions = False
        body = request.body_block
        if isinstance(body, BodyBlock) and not body.taken:
            body.taken = True
            blocks.append((body.key, body.offset))
        else:
            body = None
        try:
            for tensor in request.inputs:
                data = tensor.data
                if data is None:
                    regions = True
                    ref: m.TensorRef = region_ref(tensor.parameters, f"input '{tensor.name}'")
                    buffers.append(None)
                    tensors.append(m.Tensor(tensor.name, tensor.datatype, tensor.shape, ref))
                    continue
                size = len(data) if isinstance(data, bytes) else data.nbytes
                in_body = (
                    body.ref_of(data)
                    if body is not None and size >= self.inline_threshold
                    else None
                )
                if in_body is not None:
                    ref = in_body  # already in shared memory: the body was read there
                    buffers.append(None)
                elif size >= self.inline_threshold:
                    key, offset, view = self.arena.allocate(size)
                    blocks.append((key, offset))
                    view[:size] = data
                    ref = m.Shm(key, offset, size)
                    buffers.append(None)
                else:
                    ref = m.Inline(0)
                    buffers.append(data)
                tensors.append(m.Tensor(tensor.name, tensor.datatype, tensor.shape, ref))
        except BaseException:
            for key, offset in blocks:
                self.arena.release(key, offset)
            raise
        targets: dict[str, m.TensorRef] = {
            o.name: region_ref(o.parameters, f"output '{o.name}'")
            for o in request.outputs
            if "shared_memory_region" in o.parameters
        }
        wire = m.Infer(
            rid,
            request.model,
            request.version,
            tensors,
            [o.name for o in request.outputs],
            request.parameters,
            request.id,
            output_targets=targets,
            classification=classification_counts(request),
        )
        route = None if regions or targets else self._routes.get((wire.model, wire.version))
        direct = None if route is None else self._pick(route[1])
        if direct is not None:
            assert route is not None
            signature = route[0].signature
            checked = request.checked
            if checked is None or checked.get(id(signature)) is not signature:
                try:
                    check_request(signature, wire, buffers)
                except ServerError:
                    for key, offset in blocks:
                        self.arena.release(key, offset)
                    raise
                if checked is not None:
                    if len(checked) >= 8:  # signatures of versions since unloaded
                        checked.clear()
                    checked[id(signature)] = signature
            wire.version = route[0].version
            wire.reply_to = self.reply_endpoint
        # A client that goes away cancels this future; the entry stays until the reply
        # comes, so the arena blocks are released only once the backend is done with them.
        fut = _InferFuture(loop=asyncio.get_running_loop())
        fut._client = self
        fut._rid = rid
        self._pending[rid] = (fut, blocks, set(targets), direct)
        assert self._outbox is not None
        # Under light load there is no burst to gather: send now, not a loop turn later.
        now = self._lightly_loaded()
        if direct is None:
            self._outbox.put(None, (wire, buffers), now)
        else:
            direct.outstanding += 1
            self._outbox.put(self._host_links[direct.host_id], _Direct(direct, wire, buffers), now)
        return fut

    def _cancelled(self, rid: int) -> None:
        """Request ``rid``'s future was cancelled: tell its holder, in this wake's
        message to it (one Cancel per peer per wake)."""
        entry = self._pending.get(rid)
        if entry is None or self._outbox is None:
            return
        direct = entry[3]
        if direct is None:
            self._outbox.put(_TO_SCHEDULER_CANCELS, rid)
            return
        link = self._host_links.get(direct.host_id)
        if link is not None:
            self._outbox.put(link, _Cancel(rid))

    def _pick(self, targets: list[_Target]) -> _Target | None:
        """The instance with the fewest of this frontend's requests, among those whose
        host has a link here (None: none yet, so the request goes through the scheduler)."""
        links = self._host_links
        best = None
        for target in targets:
            if target.host_id in links and (best is None or target.outstanding < best.outstanding):
                best = target
        return best

    async def query(
        self, kind: m.QueryKind, model: str = "", version: str = "", body: bytes = b""
    ) -> control.Record | None:
        """The scheduler's answer to one control query: its typed record, or None for
        the kinds that return nothing. Raises its ServerError, or UNAVAILABLE when it
        does not answer in time."""
        qid = self._next_id
        self._next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self._queries[qid] = fut
        assert self._to_scheduler is not None
        self._to_scheduler.send([self._encode(m.Query(qid, kind, model, version, body))])
        try:
            return await asyncio.wait_for(fut, QUERY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise unavailable("the scheduler did not answer in time") from None
        finally:
            self._queries.pop(qid, None)

    # --- wire -----------------------------------------------------------------------------

    def body_block(self, size: int) -> BodyBlock | None:
        """A shared-memory block to read a large request body into (None when small)."""
        if size < self.inline_threshold:
            return None
        key, offset, view = self.arena.allocate(size)
        return BodyBlock(key, offset, view[:size])

    def drop(self, block: BodyBlock | None) -> None:
        """Free a body block that ``infer`` did not take (the request failed before)."""
        if block is not None and not block.taken:
            block.taken = True
            self.arena.release(block.key, block.offset)

    def release(self, result: InferenceResult) -> None:
        """The protocol adapter has copied ``result``'s outputs into its response: give
        the backend hosts' arena blocks back (one Release per host per wake)."""
        assert self._outbox is not None
        for link, key, offset in result.leases:
            self._outbox.put(link, (key, offset))
        result.leases = []

    def _flush(self, pending: dict) -> None:
        items = pending.pop(None, None)
        cancels = pending.pop(_TO_SCHEDULER_CANCELS, None)
        for link, entries in pending.items():
            blocks = [e for e in entries if type(e) is tuple]
            if blocks:
                link.send([self._encode(m.Release(blocks))])
            if len(blocks) < len(entries):
                directs = [e for e in entries if type(e) is _Direct]
                if directs:
                    self._flush_direct(link, directs)
                if len(blocks) + len(directs) < len(entries):  # after the requests they name
                    rids = [e.rid for e in entries if type(e) is _Cancel]
                    link.send([self._encode(m.Cancel(self.reply_endpoint, rids))])
        if items:
            self._flush_requests(items)
        if cancels:
            assert self._to_scheduler is not None
            self._to_scheduler.send([self._encode(m.Cancel(self.reply_endpoint, cancels))])
        if self._lightly_loaded():
            assert self._poll is not None
            self._poll.arm()

    def _lightly_loaded(self) -> bool:
        return 0 < len(self._pending) <= busypoll.LIGHT_LOAD

    def _flush_direct(self, link: streams.FramedProtocol, entries: list[_Direct]) -> None:
        """One ExecuteBatch to one host: an execution per request, as Triton's default
        scheduler runs them."""
        frames = outbox.FrameList()
        executions = []
        for entry in entries:
            wire = entry.wire
            frames.inline(wire.inputs, entry.buffers)
            executions.append(
                m.Execution(wire.model, wire.version, entry.target.index, [wire], True)
            )
        if not link.send(frames.finish(self._encode(m.ExecuteBatch(executions)))):
            for entry in entries:
                self._resolve_error(
                    entry.wire.rid, unavailable("the backend host's link to this frontend closed")
                )

    def _flush_requests(self, items: list) -> None:
        frames = outbox.FrameList()
        requests = []
        for wire, buffers in items:
            frames.inline(wire.inputs, buffers)
            requests.append(wire)
        assert self._to_scheduler is not None
        header = self._encode(m.InferBatch(self.reply_endpoint, requests))
        if not self._to_scheduler.send(frames.finish(header)):
            for wire in requests:
                self._resolve_error(wire.rid, unavailable("the scheduler is not reachable"))

    def _on_burst(self, burst: list[list], link: streams.FramedProtocol | None = None) -> None:
        for frames in burst:
            try:
                msg = self._decode(frames[0])
            except msgspec.DecodeError as exc:
                log.warning("dropping an undecodable message: %s", exc)
                continue
            if isinstance(msg, m.ReplyBatch):
                for reply in msg.replies:
                    self._on_reply(reply, frames, link)
            elif isinstance(msg, m.HostLink) and link is not None:
                link.peer = msg.host_id
                self._host_links[msg.host_id] = link
            elif isinstance(msg, m.Routes):
                self._on_routes(msg)
            elif isinstance(msg, m.QueryReply):
                fut = self._queries.get(msg.qid)
                if fut is not None and not fut.done():
                    if msg.error is None:
                        fut.set_result(msg.record)
                    else:
                        fut.set_exception(ServerError(Code(msg.error.code), msg.error.message))

    def _on_routes(self, msg: m.Routes) -> None:
        """The scheduler's whole table of direct routes; instances keep their counts."""
        known = {(t.host_id, t.index): t for _, targets in self._routes.values() for t in targets}
        routes: dict[tuple[str, str], tuple[m.Route, list[_Target]]] = {}
        for route in msg.routes:
            targets = [known.get((h, i)) or _Target(h, i) for h, i in route.instances]
            routes[(route.model, route.version)] = (route, targets)
            if route.default:
                routes[(route.model, "")] = (route, targets)
        self._routes = routes

    def _forget_routes(self) -> None:
        """The scheduler is gone: its hosts drop their instances, so route nothing
        directly until the next scheduler says what is there."""
        self._routes = {}

    def _link_lost(self, link: streams.FramedProtocol) -> None:
        """A backend host's link closed (the host died or is leaving): what this frontend
        sent it directly fails now, as the scheduler fails what it had sent there."""
        host_id = link.peer
        if not isinstance(host_id, str) or self._host_links.get(host_id) is not link:
            return
        del self._host_links[host_id]
        died = unavailable(
            f"the backend host running the model ({host_id}) exited while the request was in flight"
        )
        for rid, entry in list(self._pending.items()):
            if entry[3] is not None and entry[3].host_id == host_id:
                self._resolve_error(rid, died)

    def _on_reply(
        self, reply: m.InferReply, frames: list, link: streams.FramedProtocol | None
    ) -> None:
        entry = self._pending.pop(reply.rid, None)
        if entry is None:
            return
        fut, blocks, targets, direct = entry
        if direct is not None:
            direct.outstanding -= 1
        for key, offset in blocks:
            self.arena.release(key, offset)
        if reply.error is not None:
            if not fut.done():
                fut.set_exception(ServerError(Code(reply.error.code), reply.error.message))
            return
        result = InferenceResult(reply.model, reply.version, "", [])
        try:
            for t in reply.outputs:
                ref = t.ref
                data: bytes | memoryview | None = None
                if isinstance(ref, m.Inline):
                    data = frames[ref.frame]
                elif isinstance(ref, m.Shm) and t.name not in targets and link is not None:
                    # A large output in the backend host's arena: read it in place, give
                    # the block back once the response is built.
                    result.leases.append((link, ref.key, ref.offset))
                    data = self.mapper.view(ref.key, ref.offset, ref.size)
                # else: written into the client's own region; no bytes come back.
                result.outputs.append(OutputTensor(t.name, t.datatype, t.shape, data))
        except ServerError as exc:
            self.release(result)
            if not fut.done():
                fut.set_exception(exc)
            return
        if fut.done():  # the client went away
            self.release(result)
            return
        fut.set_result(result)

    def _resolve_error(self, rid: int, exc: ServerError) -> None:
        entry = self._pending.pop(rid, None)
        if entry is None:
            return
        fut, blocks, _, direct = entry
        if direct is not None:
            direct.outstanding -= 1
        for key, offset in blocks:
            self.arena.release(key, offset)
        if not fut.done():
            fut.set_exception(exc)
