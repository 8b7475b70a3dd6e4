"""The frontend's one client of the scheduler and of the backend hosts it sends to
directly: ``InferCall``s out, replies in.

Requests go to the scheduler gathered into one ``InferBatch`` per loop iteration over the
link ``scheduler_link.connect_scheduler`` picks. Replies come straight from the backend
hosts over streams to this frontend's reply listener (common/streams.py), and from the
scheduler for requests it refused or that died with their host. Each call in flight is
keyed by a frontend-local id. Its inputs are placed by ``placement.place_inputs``; the
arena blocks they fill are freed when the call's reply (or error) arrives, which is after
the backend host is done reading them.

A scheduler restart: the link connects again (scheduler_link.py). What this frontend had
sent the scheduler fails at the loss with UNAVAILABLE; requests arriving while the link is
down wait for it (``LINK_WAIT_S`` at most) and go once it is back, after the hello and
after the client shared-memory registrations forwarded through this frontend, said again
(the registry lives in the scheduler: a new one starts empty).

Direct routes (``routes.DirectRoutes``): for the model versions the scheduler lists, this
client checks the request against the model's signature itself and sends it straight to
the least busy instance's backend host, over the link that host opened to the reply
listener (its ``m.HostLink`` message). The scheduler is then off the request's path: two processes
and three wake-ups per request instead of three and five. Requests naming client
shared-memory regions still pass the scheduler, which owns the region registry.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

import msgspec

from despina.common import busypoll, control, outbox, streams
from despina.common import messages as m
from despina.common.errors import Code, ServerError, unavailable
from despina.common.settings import SpeedPaths
from despina.common.shm.arena import ShmArena, ShmMapper, arena_prefix
from despina.common.stats import (
    BACKEND,
    REJECTED,
    RESPONSE_CANCEL,
    RESPONSE_EMPTY,
    RESPONSE_FAIL,
    RESPONSE_SUCCESS,
    Recorder,
)
from despina.common.validate import check_request
from despina.services.frontend.call import InferCall
from despina.services.frontend.inference import InferenceRequest, InferenceResult, OutputTensor
from despina.services.frontend.placement import (
    BodyBlock,
    classification_counts,
    place_inputs,
    region_ref,
)
from despina.services.frontend.routes import DirectRoutes, Target
from despina.services.frontend.scheduler_link import SchedulerLink, connect_scheduler

log = logging.getLogger("despina.frontend")

QUERY_TIMEOUT_S = 10.0
# How long a request or query waits for a lost link to the scheduler to come back.
LINK_WAIT_S = 5.0


class _Direct:
    """A request bound for one instance over its host's link, waiting for the flush."""

    __slots__ = ("target", "wire", "buffers")

    def __init__(self, target: Target, wire: m.Infer, buffers: list) -> None:
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


class SchedulerClient:
    """Not thread-safe: one per frontend process, used from its loop."""

    def __init__(
        self,
        scheduler_endpoint: str,
        reply_endpoint: str,
        *,
        inline_threshold: int,
        arena_segment_size: int = 64 * 1024 * 1024,
        speed: SpeedPaths | None = None,
    ) -> None:
        """``speed``: the speed paths (busy polling, burst sends, direct routes); default
        all on."""
        speed = speed or SpeedPaths()
        self.scheduler_endpoint = scheduler_endpoint
        self.listen_endpoint = reply_endpoint
        # What backend hosts are told to send replies to (differs behind NAT/containers).
        self.reply_endpoint = reply_endpoint
        self.inline_threshold = inline_threshold
        self.direct_routes = speed.direct_routes
        self._burst = speed.burst
        self.arena = ShmArena(arena_prefix("fe"), arena_segment_size)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, InferCall] = {}  # rid -> the call its reply resolves
        self.routes = DirectRoutes()
        self._host_links: dict[str, streams.FramedProtocol] = {}  # host_id -> its link
        self.mapper = ShmMapper(capacity=16)
        self._queries: dict[int, asyncio.Future] = {}
        self._next_id = 1
        self._encode = m.encoder().encode
        self._decode = m.decoder(m.FrontendInbound).decode
        # Who takes the scheduler's logging and trace settings (each DataPlane).
        self.settings_listeners: list[Callable[[m.Settings], None]] = []
        self.settings: m.Settings | None = None  # the last received
        self._to_scheduler: SchedulerLink | None = None
        # Set while the link to the scheduler is up. While it is down (the scheduler
        # restarts): the requests waiting for it (wire, buffers, deadline), sent by
        # ``_hello``; the registrations forwarded through this frontend, (kind, name) ->
        # body, registered again by ``_hello``; the qids of those re-registrations.
        self._linked = asyncio.Event()
        self._holding = False  # the same, for the flush: requests wait (``_park``)
        self._losses = 0  # how many times the link was lost (0: never yet)
        self._parked: list[tuple[m.Infer, list, float]] = []
        self._park_timer: asyncio.TimerHandle | None = None
        self._regions: dict[tuple[str, str], bytes] = {}
        self._reregistering: dict[int, tuple[str, str]] = {}
        self._replies: asyncio.AbstractServer | None = None
        self._outbox: outbox.Outbox | None = None
        self._busy_poll_s = speed.busy_poll_s
        self._poll: busypoll.BusyPoll | None = None
        # This frontend's statistics deltas (common/stats.py), None when not counting
        # (--allow-metrics=false): ``count_statistics`` turns it on before ``start``.
        self.stats: Recorder | None = None
        self._burst_at = 0.0  # when the burst of replies being read was (when counting)

    def count_statistics(self) -> None:
        """Count every call's outcome and duration, reported to the scheduler."""
        self.stats = Recorder(self._report_stats)

    def _report_stats(self, report: m.StatsReport) -> None:
        if self._to_scheduler is not None:
            self._to_scheduler.send([self._encode(report)])

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._replies = await streams.serve(
            self.listen_endpoint, lambda link, burst: self._on_burst(burst, link), self._link_lost
        )
        bound = streams.bound_endpoint(self.listen_endpoint, self._replies)
        if self.reply_endpoint == self.listen_endpoint:  # not advertised otherwise
            self.reply_endpoint = bound
        self.listen_endpoint = bound
        self._outbox = outbox.Outbox(self._flush, burst=self._burst)
        # Poll while a few requests are out: their replies come within the budget.
        self._poll = busypoll.BusyPoll(self._busy_poll_s, self._lightly_loaded)
        self._to_scheduler = await connect_scheduler(
            self.scheduler_endpoint, self._on_burst, self._hello, self._scheduler_lost
        )

    def _hello(self, link: SchedulerLink) -> None:
        """The link is (again) up: say hello, register again the client shared-memory
        regions registered through this frontend, then, after a loss, let the requests that
        wait go once it is ready (``_until_ready``). In that order on the one stream: the
        scheduler knows the regions before any request names them."""
        link.send([self._encode(m.FrontendHello(m.PROTOCOL_VERSION, self.reply_endpoint))])
        for (kind, name), body in list(self._regions.items()):
            qid = self._next_id
            self._next_id += 1
            fut = asyncio.get_running_loop().create_future()
            self._queries[qid] = fut
            self._reregistering[qid] = (kind, name)
            fut.add_done_callback(functools.partial(self._reregistered, qid))
            link.send([self._encode(m.Query(qid, kind, name, "", body))])
        if self._regions:
            log.info("registering %d shared memory region(s) again", len(self._regions))
        if self._losses:  # a new scheduler: requests go once its models are ready
            asyncio.get_running_loop().create_task(self._until_ready(link, self._losses))
        else:
            self._linked.set()

    async def _until_ready(self, link: SchedulerLink, losses: int) -> None:
        """Ask the scheduler, connected again, whether it is ready (its models loaded
        again) until it is or ``LINK_WAIT_S`` passed, then let the requests go."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINK_WAIT_S
        while loop.time() < deadline and losses == self._losses:
            qid = self._next_id
            self._next_id += 1
            fut = loop.create_future()
            self._queries[qid] = fut
            link.send([self._encode(m.Query(qid, "server_ready"))])
            try:
                await asyncio.wait_for(fut, 1.0)
                break
            except (ServerError, asyncio.TimeoutError):
                await asyncio.sleep(0.05)
            finally:
                self._queries.pop(qid, None)
        if losses == self._losses:
            log.info("the scheduler is back: sending %d waiting request(s)", len(self._parked))
            self._link_up()

    def _link_up(self) -> None:
        """Requests go to the scheduler again, the waiting ones first."""
        self._linked.set()
        self._holding = False
        if self._park_timer is not None:
            self._park_timer.cancel()
            self._park_timer = None
        parked, self._parked = self._parked, []
        items = []
        for wire, buffers, _ in parked:
            call = self._pending.get(wire.rid)
            if call is None:
                continue
            if call.done():  # the client went away while it waited
                self._resolve_error(wire.rid, unavailable("cancelled"))
            else:
                items.append((wire, buffers))
        if items:
            self._flush_requests(items)

    def _reregistered(self, qid: int, fut: asyncio.Future) -> None:
        """A re-registration's answer: a refusal (the client removed the object, the new
        scheduler refuses client shared memory) is logged and the region forgotten."""
        self._queries.pop(qid, None)
        kind, name = self._reregistering.pop(qid)
        if fut.cancelled():  # the link went again: the next hello says it again
            return
        exc = fut.exception()
        if exc is None:
            log.info("shared memory region '%s' registered again", name)
        elif not (isinstance(exc, ServerError) and exc.code is Code.ALREADY_EXISTS):
            log.error("shared memory region '%s' could not be registered again: %s", name, exc)
            self._regions.pop((kind, name), None)

    def _scheduler_lost(self) -> None:
        """The link to the scheduler broke: its direct routes go (the new scheduler sends
        its own); what was sent to it (requests, queries) fails now with UNAVAILABLE, since
        its answer will not come; requests from now on wait for the link (``_park``)."""
        self._linked.clear()
        self._holding = True
        self._losses += 1
        self.routes.forget()
        waiting = {wire.rid for wire, _, _ in self._parked}
        lost = unavailable(
            "the scheduler was lost while the request was in flight (it is restarting: retry)"
        )
        for rid, call in list(self._pending.items()):
            if call.target is None and rid not in waiting:
                self._resolve_error(rid, lost)
        for qid, fut in list(self._queries.items()):
            if fut.done():
                continue
            if qid in self._reregistering:
                fut.cancel()
            else:
                fut.set_exception(unavailable("the scheduler was lost before it answered"))

    def _park(self, items: list) -> None:
        """Requests the link could not take: they wait ``LINK_WAIT_S`` for it to come
        back (``_hello`` sends them), then fail with UNAVAILABLE."""
        assert self.loop is not None
        deadline = self.loop.time() + LINK_WAIT_S
        self._parked += [(wire, buffers, deadline) for wire, buffers in items]
        if self._park_timer is None:
            self._park_timer = self.loop.call_later(LINK_WAIT_S, self._expire_parked)

    def _expire_parked(self) -> None:
        assert self.loop is not None
        self._park_timer = None
        now = self.loop.time()
        expired = [p for p in self._parked if p[2] <= now]
        self._parked = [p for p in self._parked if p[2] > now]
        for wire, _, _ in expired:
            self._resolve_error(
                wire.rid,
                unavailable(f"the scheduler did not come back within {LINK_WAIT_S:g} s"),
            )
        if self._parked:
            self._park_timer = self.loop.call_later(self._parked[0][2] - now, self._expire_parked)

    def close(self) -> None:
        for call in self._pending.values():
            if not call.done():
                call.set_exception(unavailable("the frontend is shutting down"))
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

    # --- calls ------------------------------------------------------------------------------

    def call(self, body: BodyBlock | None = None) -> InferCall:
        """A new call, owning ``body`` (the block its request was read into, if any)."""
        return InferCall(self, body)

    def send(self, call: InferCall, request: InferenceRequest) -> InferCall:
        """Send ``request`` as ``call``: the call resolves to an ``InferenceResult`` or
        raises ``ServerError``. Raises ServerError at once for what can be refused here
        (the call still owns its buffers: close it)."""
        call.request = request
        blocks = call.blocks
        body = call.body
        if body is not None:
            body.taken = True  # from here on, one of the call's input blocks
            blocks.append((body.key, body.offset))
        try:
            tensors, buffers, regions = place_inputs(
                request, body, self.arena, self.inline_threshold, blocks
            )
            targets: dict[str, m.TensorRef] = {
                o.name: region_ref(o.parameters, f"output '{o.name}'")
                for o in request.outputs
                if "shared_memory_region" in o.parameters
            }
            wire = m.Infer(
                0,
                request.model,
                request.version,
                tensors,
                [o.name for o in request.outputs],
                request.parameters,
                request.id,
                output_targets=targets,
                classification=classification_counts(request),
                trace=call.trace,
            )
            picked = (
                None
                if regions or targets or not self.direct_routes
                else self.routes.pick(wire.model, wire.version, self._host_links)
            )
            if picked is not None:
                route, target = picked
                signature = route.signature
                checked = request.checked
                if checked is None or checked.get(id(signature)) is not signature:
                    check_request(signature, wire, buffers)
                    if checked is not None:
                        if len(checked) >= 8:  # signatures of versions since unloaded
                            checked.clear()
                        checked[id(signature)] = signature
                wire.version = route.version
                wire.reply_to = self.reply_endpoint
        except BaseException:
            self._release_blocks(call)
            call.reason = REJECTED
            raise
        rid = self._next_id
        self._next_id += 1
        wire.rid = call.rid = rid
        if call.stream:
            wire.stream = True
        if call.t0:
            call.t_sent = time.monotonic()
        if targets:
            call.targets = set(targets)
        self._pending[rid] = call
        assert self._outbox is not None
        # Under light load there is no burst to gather: send now, not a loop turn later.
        now = self._lightly_loaded()
        if picked is None:
            self._outbox.put(None, (wire, buffers), now)
        else:
            call.target = target
            target.outstanding += 1
            call.sent = entry = _Direct(target, wire, buffers)
            self._outbox.put(self._host_links[target.host_id], entry, now)
        return call

    def cancelled(self, call: InferCall) -> None:
        """``call`` was cancelled: tell its holder, in this wake's message to it (one
        Cancel per peer per wake). Its entry stays until the reply or CANCELLED error
        comes, so its input blocks are freed only once the holder is done with them."""
        if call.rid not in self._pending or self._outbox is None:
            return
        target = call.target
        if target is None:
            # A decoupled request sends on after its execution ended, which the scheduler
            # forgets: its host (that a response came from) is told.
            host = call.host if call.stream else None  # type: ignore[attr-defined]
            if host is not None:
                self._outbox.put(host, _Cancel(call.rid))
            else:
                self._outbox.put(_TO_SCHEDULER_CANCELS, call.rid)
            return
        link = self._host_links.get(target.host_id)
        if link is not None:
            self._outbox.put(link, _Cancel(call.rid))

    def _release_blocks(self, call: InferCall) -> None:
        """Free the call's input blocks: the holder is done reading them."""
        arena = self.arena
        for key, offset in call.blocks:
            arena.release(key, offset)
        call.blocks = []

    def release_leases(self, leases: list) -> None:
        """The protocol has copied these outputs into its response: give the backend
        hosts' arena blocks back (one Release per host per wake)."""
        assert self._outbox is not None
        for link, key, offset in leases:
            self._outbox.put(link, (key, offset))

    async def query(
        self,
        kind: m.QueryKind,
        model: str = "",
        version: str = "",
        body: bytes = b"",
        timeout: float = QUERY_TIMEOUT_S,
    ) -> control.Record | None:
        """The scheduler's answer to one control query: its typed record, or None for
        the kinds that return nothing. Raises its ServerError, or UNAVAILABLE when it
        does not answer within ``timeout`` seconds."""
        log.debug("query %s '%s' version '%s'", kind, model, version)
        if kind.endswith("shm_unregister"):  # forgotten whatever the answer
            registered = kind.replace("unregister", "register")
            for key in [k for k in self._regions if k[0] == registered]:
                if not model or key[1] == model:
                    del self._regions[key]
        if not self._linked.is_set():  # the scheduler restarts: wait for it, a while
            if kind == "server_ready":  # a probe: not ready now, say so now
                raise unavailable("the scheduler is not reachable (restarting)")
            try:
                await asyncio.wait_for(self._linked.wait(), min(timeout, LINK_WAIT_S))
            except asyncio.TimeoutError:
                raise unavailable("the scheduler is not reachable") from None
        qid = self._next_id
        self._next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self._queries[qid] = fut
        assert self._to_scheduler is not None
        self._to_scheduler.send([self._encode(m.Query(qid, kind, model, version, body))])
        try:
            record = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise unavailable("the scheduler did not answer in time") from None
        finally:
            self._queries.pop(qid, None)
        if kind.endswith("shm_register"):  # said again to a scheduler started again
            self._regions[(kind, model)] = body
        return record

    # --- wire -----------------------------------------------------------------------------

    def body_block(self, size: int) -> BodyBlock | None:
        """A shared-memory block to read a large request body into (None when small);
        the transport owns it until it hands it to a call (``call(body)``), and frees one
        it never hands on with ``release_body``."""
        if size < self.inline_threshold:
            return None
        key, offset, view = self.arena.allocate(size)
        return BodyBlock(key, offset, view[:size])

    def release_body(self, block: BodyBlock | None) -> None:
        """Free a body block that no call took."""
        if block is not None and not block.taken:
            block.taken = True
            self.arena.release(block.key, block.offset)

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
        if self._holding:  # the scheduler restarts: wait for it
            self._park(items)
            return
        header = self._encode(m.InferBatch(self.reply_endpoint, requests))
        if not self._to_scheduler.send(frames.finish(header)):
            if getattr(self._to_scheduler, "reconnects", False):
                self._park(items)  # it comes back: wait for it
                return
            for wire in requests:
                self._resolve_error(wire.rid, unavailable("the scheduler is not reachable"))

    def _on_burst(self, burst: list[list], link: streams.FramedProtocol | None = None) -> None:
        if self.stats is not None:  # when its replies were read: one clock read a burst
            self._burst_at = time.monotonic()
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
            elif isinstance(msg, m.HostGone):
                self._host_gone(msg)
            elif isinstance(msg, m.Routes):
                self.routes.update(msg)
            elif isinstance(msg, m.Settings):
                self.settings = msg
                for listener in self.settings_listeners:
                    listener(msg)
            elif isinstance(msg, m.StatsFlush):  # a statistics query: what is counted, now
                if self.stats is not None:
                    self.stats.flush(msg.token)
                else:
                    self._report_stats(m.StatsReport([], msg.token))
            elif isinstance(msg, m.QueryReply):
                fut = self._queries.get(msg.qid)
                if fut is not None and not fut.done():
                    if msg.error is None:
                        fut.set_result(msg.record)
                    else:
                        fut.set_exception(ServerError(Code(msg.error.code), msg.error.message))

    def _link_lost(self, link: streams.FramedProtocol) -> None:
        """A backend host's link closed (the host died or is leaving): what this frontend
        sent it directly fails now, as the scheduler fails what it had sent there."""
        host_id = link.peer
        if not isinstance(host_id, str) or self._host_links.get(host_id) is not link:
            return
        del self._host_links[host_id]
        self._fail_direct(host_id, "exited")

    def _host_gone(self, msg: m.HostGone) -> None:
        """The scheduler declared a backend host gone (its stream closed, or it stopped
        answering while its link here may stay open, frozen): send it nothing more until
        it introduces itself again (``m.HostLink``), and fail what was sent it directly."""
        self._host_links.pop(msg.host_id, None)
        self._fail_direct(msg.host_id, msg.why)

    def _fail_direct(self, host_id: str, why: str) -> None:
        """Every call this frontend sent ``host_id`` directly is sent once more to
        another host's instance of its model version (``_retry_direct``), or fails with
        UNAVAILABLE."""
        died = unavailable(
            f"the backend host running the model ({host_id}) {why} while the request was in flight"
        )
        for rid, call in list(self._pending.items()):
            if call.target is not None and call.target.host_id == host_id:
                if not self._retry_direct(call, host_id):
                    self._resolve_error(rid, died)

    def _retry_direct(self, call: InferCall, host_id: str) -> bool:
        """Send ``call``, whose host was lost, to the least busy instance of its model
        version on another host linked here, as the scheduler does with what it had
        sent a lost host (dispatch.Dispatcher.fail_host): once, and not a request of a
        sequence (its state was on the lost instance). Its inputs are still where they
        were (its input blocks are freed only by its reply or error). False: nothing
        to retry on; the caller fails it."""
        sent = call.sent
        call.sent = None
        if type(sent) is not _Direct or call.done():
            return False
        wire = sent.wire
        if wire.parameters.get("sequence_id"):
            return False
        picked = self.routes.pick(wire.model, wire.version, self._host_links)
        if picked is None or picked[1].host_id == host_id:
            return False
        target = picked[1]
        sent.target.outstanding -= 1
        call.target = target
        target.outstanding += 1
        assert self._outbox is not None
        self._outbox.put(
            self._host_links[target.host_id], _Direct(target, wire, sent.buffers), True
        )
        log.warning(
            "request %r for '%s' version %s: its backend host %s was lost; sent again to %s",
            wire.request_id or wire.rid,
            wire.model,
            wire.version,
            host_id,
            target.host_id,
        )
        return True

    def _on_reply(
        self, reply: m.InferReply, frames: list, link: streams.FramedProtocol | None
    ) -> None:
        if reply.part:  # one response of a decoupled model's several, or its empty end
            self._on_part(reply, frames, link)
            return
        call = self._pending.pop(reply.rid, None)
        if call is None:
            if link is not None:  # answered already (a lost host's late reply, or a retry's)
                for t in reply.outputs:
                    if isinstance(t.ref, m.Shm):
                        self._outbox.put(link, (t.ref.key, t.ref.offset))  # type: ignore[union-attr]
            return
        # ``_settle``, inline: one call fewer on every reply.
        if call.target is not None:
            call.target.outstanding -= 1
        if call.blocks:
            self._release_blocks(call)
        if call.trace is not None:
            call.trace = reply.trace  # the stamps of the processes it passed
        if reply.error is not None:
            call.reason = BACKEND if link is not None else REJECTED
            if not call.done():
                call.set_exception(ServerError(Code(reply.error.code), reply.error.message))
            return
        result = InferenceResult(reply.model, reply.version, call.request.id, [])  # type: ignore[union-attr]
        leases = call.leases
        targets = call.targets
        try:
            for t in reply.outputs:
                ref = t.ref
                data: bytes | memoryview | None = None
                if isinstance(ref, m.Inline):
                    data = frames[ref.frame]
                elif isinstance(ref, m.Shm) and t.name not in targets and link is not None:
                    # A large output in the backend host's arena: read it in place, give
                    # the block back when the call closes.
                    leases.append((link, ref.key, ref.offset))
                    data = self.mapper.view(ref.key, ref.offset, ref.size)
                # else: written into the client's own region; no bytes come back.
                result.outputs.append(OutputTensor(t.name, t.datatype, t.shape, data))
        except ServerError as exc:
            call.close()
            if not call.done():
                call.set_exception(exc)
            return
        if call.done():  # the client went away
            call.close()
            return
        if call.t0:
            call.t_reply = self._burst_at  # set only with a result (InferCall.close)
        call.set_result(result)

    def _on_part(
        self, reply: m.InferReply, frames: list, link: streams.FramedProtocol | None
    ) -> None:
        """A decoupled model's reply (``InferReply.part``): one response of several
        (``m.PART_MORE``), handed to its ``StreamCall.on_response`` while the call stays
        pending; its last response (``m.PART_FINAL``), or the end without one
        (``m.PART_EMPTY_FINAL``: a result without outputs, ``empty_final`` set), which
        resolves the call. Counted by index in the statistics (``response_stats``) when
        they are on; the end of a cancelled call as its cancel. Its outputs came inline
        (or into the client's regions): no lease."""
        part = reply.part
        if part == m.PART_MORE:
            call = self._pending.get(reply.rid)
        else:
            call = self._settle(reply.rid)
        if call is None or not call.stream:
            return
        call.host = link  # type: ignore[attr-defined]
        stats = self.stats
        now = time.monotonic()
        ns = int((now - call.t_part) * 1e9)  # type: ignore[attr-defined]
        if call.done():  # the client went away
            if stats is not None and part != m.PART_MORE:
                stats.response(reply.model, reply.version, call.responses, RESPONSE_CANCEL, ns)  # type: ignore[attr-defined]
            return
        response: ServerError | InferenceResult
        if reply.error is not None:
            response = ServerError(Code(reply.error.code), reply.error.message)
            kind = RESPONSE_FAIL
        else:
            response = InferenceResult(reply.model, reply.version, call.request.id, [])  # type: ignore[union-attr]
            kind = RESPONSE_EMPTY if part == m.PART_EMPTY_FINAL else RESPONSE_SUCCESS
            targets = call.targets
            for t in reply.outputs:
                data = frames[t.ref.frame] if isinstance(t.ref, m.Inline) else None
                if data is None and t.name not in targets:
                    continue
                response.outputs.append(OutputTensor(t.name, t.datatype, t.shape, data))
        if stats is not None:
            stats.response(reply.model, reply.version, call.responses, kind, ns)  # type: ignore[attr-defined]
        call.t_part = now  # type: ignore[attr-defined]
        call.responses += 1  # type: ignore[attr-defined]
        if part == m.PART_MORE:
            call.on_response(call, response)  # type: ignore[attr-defined]
            return
        if type(response) is ServerError:
            call.reason = BACKEND
            call.set_exception(response)
            return
        if call.t0:
            call.t_reply = now  # set only with a result: what InferCall.close counts a success
        call.empty_final = part == m.PART_EMPTY_FINAL  # type: ignore[attr-defined]
        call.set_result(response)

    def _settle(self, rid: int) -> InferCall | None:
        """The pending call ``rid``, no longer pending: its instance has one request less
        outstanding and its input blocks go back (None: no such call pending)."""
        call = self._pending.pop(rid, None)
        if call is not None:
            if call.target is not None:
                call.target.outstanding -= 1
            if call.blocks:
                self._release_blocks(call)
        return call

    def _resolve_error(self, rid: int, exc: ServerError) -> None:
        call = self._settle(rid)
        if call is None:
            return
        if not call.done():
            call.set_exception(exc)
