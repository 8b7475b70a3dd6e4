"""Outbound requests and what is in flight: batches from the per-model schedulers go to
their instances' hosts, one message per peer per wake; the in-flight table knows each
sent request until its host reports it done; error replies go to the frontends.

One class, ``Dispatcher``, with the scheduler's hot path in it: ``dispatch`` puts planned
batches in the wake's outbox, ``flush`` sends them, ``completed`` frees instances.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import msgspec

from despina.common import messages as m
from despina.common import outbox, streams
from despina.common.errors import Code, ServerError, unavailable
from despina.services.scheduler.interface import ModelScheduler, Pending, Slot

if TYPE_CHECKING:
    from despina.common.transport import SocketDriver

log = logging.getLogger("despina.scheduler")

# The scheduler's stream to one backend host: the host's identity here (when it closes,
# the host is gone). Not ``messages.HostLink``, which is a host's greeting on its link to
# a frontend.
HostStream: TypeAlias = streams.FramedProtocol
# A frontend is known by its ZeroMQ identity, or by its stream when it uses one.
FrontendId: TypeAlias = bytes | streams.FramedProtocol

# Put in a queued request's ``Pending.buffers`` when its client went away: it was answered
# CANCELLED then, and is skipped when its turn to be sent comes (the queues are the
# per-model schedulers', so the scheduler marks it rather than pulling it out).
DROPPED: list = []


def _not_started(*_args: object) -> None:
    raise RuntimeError("Dispatcher.start() was not called")


@dataclass(slots=True)
class InFlight:
    frontend: FrontendId
    reply_to: str
    rid: int
    slot: Slot
    # The request as it was queued, kept until its host reports it done: a host that is
    # lost has it sent again once elsewhere (``fail_host``). Its inline bytes are frames
    # of the frontend's message, kept alive by it; its shared-memory inputs stay the
    # frontend's until the frontend has the request's reply, which it has not yet.
    pending: Pending


class Dispatcher:
    """Owns the in-flight table (sid -> InFlight), the sid counter and the wake's outbox;
    sends batches to hosts and replies to frontends. Runs on the loop's thread only."""

    def __init__(
        self, schedulers: dict[tuple[str, str], ModelScheduler], *, burst: bool = True
    ) -> None:
        self._burst = burst  # False: each message sent at once (common/settings.py)
        self.schedulers = schedulers
        self.inflight: dict[int, InFlight] = {}
        # The reply endpoint -> frontend table that ``routes.RoutePublisher`` keeps;
        # read here to answer undelivered replies.
        self.frontends: dict[str, FrontendId] = {}
        self.driver: SocketDriver | None = None  # the ZeroMQ frontends' socket, if any
        self._next_sid = 1
        self._encode = m.encoder().encode
        self._put: Callable[..., None] = _not_started

    def start(self, driver: SocketDriver | None) -> None:
        """Open the wake's outbox on the running loop; ``driver``: the ZeroMQ frontends'
        socket, or None."""
        self.driver = driver
        self._put = outbox.Outbox(self.flush, burst=self._burst).put

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()

    # --- to hosts ---------------------------------------------------------------------

    def dispatch(self, key: tuple[str, str]) -> None:
        """Put what model version ``key``'s scheduler can start now in this wake's outbox."""
        put = self._put
        for slot, pendings in self.schedulers[key].next_batches():
            put(slot.host, (slot, pendings))

    def flush(self, pending: dict) -> None:
        """Send everything one wake produced: one message per peer. A peer is a
        frontend (ZeroMQ identity or stream), sent replies, or a backend host's stream,
        sent batches."""
        for peer, items in pending.items():
            if isinstance(items[0], m.InferReply):
                self.send_frontend(peer, m.ReplyBatch(items))
                continue
            frames = outbox.FrameList()
            executions: list[m.Execution] = []
            inflight = self.inflight
            for slot, pendings in items:
                requests = []
                for p in pendings:
                    if p.buffers is DROPPED:
                        continue  # its client went away while it waited; answered then
                    req = p.request
                    frames.inline(req.inputs, p.buffers)
                    req.sid = sid = self._next_sid
                    self._next_sid += 1
                    inflight[sid] = InFlight(p.frontend, req.reply_to, req.rid, slot, p)
                    requests.append(req)
                if not requests:  # all cancelled: the instance is free again
                    self._release_slot(slot)
                    continue
                executions.append(m.Execution(slot.model, slot.version, slot.index, requests))
            if not executions:
                continue
            if not peer.send(frames.finish(self._encode(m.ExecuteBatch(executions)))):
                self._fail_executions(executions, "the backend host is not reachable")

    def _release_slot(self, slot: Slot) -> None:
        """An execution that was planned for ``slot`` will not run: the slot takes the
        next one."""
        key = (slot.model, slot.version)
        sched = self.schedulers.get(key)
        if sched is not None:
            sched.completed(slot, 1)
            self.dispatch(key)

    def _fail_executions(self, executions: list[m.Execution], why: str) -> None:
        for execution in executions:
            slot = None
            for req in execution.requests:
                entry = self.inflight.pop(req.sid, None)
                if entry is not None:
                    slot = entry.slot
                    self.fail(entry, unavailable(why))
            if slot is not None:
                slot.busy = max(0, slot.busy - 1)

    def send_host(self, host: HostStream, msg: msgspec.Struct) -> None:
        host.send([self._encode(msg)])

    # --- from hosts and frontends -----------------------------------------------------

    def completed(self, msg: m.Completion, touched: set) -> None:
        """A host finished executions: free their instances (``touched`` gets the model
        versions to dispatch again) and answer the replies it could not deliver."""
        for reply_to, rid, model, version in msg.undelivered:
            frontend = self.frontends.get(reply_to)
            if frontend is None:
                continue
            why = unavailable(
                f"the backend host could not send the reply to this frontend at {reply_to}: "
                "check the frontend's advertised reply endpoint"
            )
            self.error_reply(frontend, rid, model, version, why)
        for model, version, _instance, sids in msg.done:
            slot = None
            for sid in sids:
                entry = self.inflight.pop(sid, None)
                if entry is not None:
                    slot = entry.slot
            if slot is not None:
                sched = self.schedulers.get((model, version))
                if sched is not None:
                    sched.completed(slot, 1)  # one execution, however many requests
                    touched.add((model, version))

    def cancel(self, msg: m.Cancel) -> None:
        """A frontend's clients went away: their requests still queued here are answered
        CANCELLED and never sent; those already sent to a host are cancelled there (one
        Cancel per host), which drops them if they have not started. Costs a scan of the
        queues and the in-flight table per Cancel message (at most one per frontend wake)."""
        rids = set(msg.rids)
        reply_to = msg.reply_to
        error = ServerError(Code.CANCELLED, "the request was cancelled before it ran")
        for sched in self.schedulers.values():
            for p in _queued(sched):
                req = p.request
                if req.rid in rids and req.reply_to == reply_to and p.buffers is not DROPPED:
                    p.buffers = DROPPED
                    self.reply_error(p.frontend, req, error)
        sent: dict[HostStream, list[int]] = {}
        for entry in self.inflight.values():
            if entry.rid in rids and entry.reply_to == reply_to:
                sent.setdefault(entry.slot.host, []).append(entry.rid)
        for host, cancelled in sent.items():
            self.send_host(host, m.Cancel(reply_to, cancelled))

    def fail_host(
        self,
        host: HostStream,
        exc: ServerError,
        *,
        lost: str = "",
        sequences: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        """The host is gone (its slots already removed from the schedulers). Each request
        in flight on it is, when stateless and not sent again before, queued again on
        its model version, once, when another instance of it is left; a request of a
        sequence (a ``sequence_id``, or a model in ``sequences``) gets the lost-sequence
        error, never a retry (its state died with the host); any other gets ``exc``.
        ``lost``: what happened to the host, for the lost-sequence error ("exited").
        Runs on the loop's thread; sends the retries in this wake."""
        again: set[tuple[str, str]] = set()
        for sid, entry in list(self.inflight.items()):
            if entry.slot.host is not host:
                continue
            del self.inflight[sid]
            p = entry.pending
            req = p.request
            key = (entry.slot.model, entry.slot.version)
            sequence_id = req.parameters.get("sequence_id")
            if sequence_id or key[0] in sequences:
                self.fail(entry, lost_sequence(req, sequence_id, lost or "exited"))
                continue
            sched = self.schedulers.get(key)
            if p.retried or sched is None or sched.slot_count == 0:
                self.fail(entry, exc)
                continue
            sched.enqueue(Pending(p.frontend, req, p.buffers, retried=True))
            again.add(key)
        if again:
            log.warning(
                "sending the requests that were in flight on a lost backend host to other "
                "instances of %s",
                ", ".join(f"'{name}' version {version}" for name, version in sorted(again)),
            )
        for key in again:
            self.dispatch(key)

    def announce_gone(self, host_id: str, why: str) -> None:
        """Tell every frontend that ``host_id`` is gone (``messages.HostGone``): each
        fails what it sent the host directly, and sends it nothing more."""
        notice = m.HostGone(host_id, why)
        for frontend in list(self.frontends.values()):
            self.send_frontend(frontend, notice)

    # --- to frontends -----------------------------------------------------------------

    def error_reply(
        self, frontend: FrontendId, rid: int, model: str, version: str, exc: ServerError
    ) -> None:
        """Answer one request with an error, in this wake's message to its frontend."""
        error = m.Error(exc.code.value, exc.message)
        self._put(frontend, m.InferReply(rid, model, version, [], error))

    def reply_error(self, frontend: FrontendId, req: m.Infer, exc: ServerError) -> None:
        self.error_reply(frontend, req.rid, req.model, req.version, exc)

    def fail(self, entry: InFlight, exc: ServerError) -> None:
        self.error_reply(entry.frontend, entry.rid, entry.slot.model, entry.slot.version, exc)

    def send_frontend(self, identity: FrontendId, msg: msgspec.Struct) -> None:
        """Send now, outside the wake's batch (control answers, routes, replies)."""
        if isinstance(identity, bytes):
            assert self.driver is not None
            self.driver.send([identity, self._encode(msg)])
        else:
            identity.send([self._encode(msg)])


def lost_sequence(req: m.Infer, sequence_id: object, lost: str) -> ServerError:
    """The error of a request whose sequence lived on a host that was lost: the
    sequence's state is gone, and only a new sequence (START) can go on."""
    which = f"sequence {sequence_id} " if sequence_id else "a sequence "
    return unavailable(
        f"inference request for {which}to model '{req.model}' failed: the backend host "
        f"holding the sequence {lost}, and the sequence's state is lost; start the "
        "sequence again with the START flag"
    )


def _queued(sched: ModelScheduler) -> list[Pending]:
    """What ``sched`` holds queued: the default scheduler's queue and, for a dynamic
    batcher, its ``Batcher``'s items (the ModelScheduler protocol has no such method yet)."""
    queued: list[Pending] = list(getattr(sched, "queue", ()))
    batcher = getattr(sched, "batcher", None)
    if batcher is not None:
        queued.extend(batcher.items)
    return queued
