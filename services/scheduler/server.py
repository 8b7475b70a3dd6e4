"""The scheduler service: one ROUTER socket that frontends and backend hosts connect to.

It moves metadata only. Frontends send batches of requests; the scheduler checks each
against its model's config, queues it on that model version's scheduler, and hands
batches to free instances on the backend hosts, one message per host per wake. Backend
hosts reply to the frontends directly and report completions back here in batches.

Failure handling: a request that cannot run gets an error reply to its frontend; a
backend host that stops heartbeating has its in-flight requests failed with UNAVAILABLE
and its instances placed again when a host of the same framework (re)joins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import orjson
import zmq
from zmq.utils import monitor as zmq_monitor

from despina.common import messages as m
from despina.common import transport
from despina.common.errors import Code, ServerError, not_found, unavailable
from despina.common.model_config import instance_count
from despina.services.scheduler import validate
from despina.services.scheduler.default import DefaultScheduler
from despina.services.scheduler.interface import ModelScheduler, Pending, Slot
from despina.services.scheduler.repository import Model, ModelVersion, State, scan

log = logging.getLogger("despina.scheduler")

HEARTBEAT_TIMEOUT_S = 1.5


@dataclass(eq=False)
class Host:
    identity: bytes
    host_id: str
    framework: str
    pid: int
    last_seen: float
    instance_of: tuple[str, str, int] | None = None
    loads: set[tuple[str, str]] = field(default_factory=set)
    fd: int = -1  # the scheduler-side connection's file descriptor (for disconnect events)


@dataclass(slots=True)
class InFlight:
    frontend: bytes
    reply_to: str
    rid: int
    slot: Slot


class SchedulerServer:
    """Owns the repository state, the hosts, the queues and the in-flight table. All
    methods run on the loop's thread."""

    def __init__(self, endpoint: str, repositories: list[Path]) -> None:
        self.endpoint = endpoint
        self.repositories = repositories
        self.models: dict[str, Model] = scan(repositories)
        self.schedulers: dict[tuple[str, str], ModelScheduler] = {}
        self.hosts: dict[bytes, Host] = {}
        self.hosts_by_id: dict[str, Host] = {}
        self.inflight: dict[int, InFlight] = {}
        self.reply_to: dict[bytes, str] = {}  # frontend identity -> reply endpoint
        self._next_sid = 1
        self._encode = m.encoder().encode
        self._decode = m.decoder(m.SchedulerInbound).decode
        self._driver: transport.SocketDriver | None = None
        self._outbox: transport.Outbox | None = None
        self._stopping = asyncio.Event()
        for model in self.models.values():
            for version in model.versions:
                self.schedulers[(model.name, version)] = DefaultScheduler()

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        ctx = transport.make_context()
        sock = transport.configure(ctx.socket(zmq.ROUTER))
        sock.bind(self.endpoint)
        # A peer's death closes its connection at once (ipc or tcp); the monitor says
        # which connection closed, and the SRCFD recorded at hello says whose it was.
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._monitor = transport.SocketDriver(monitor, self._on_monitor)
        self._driver = transport.SocketDriver(sock, self._on_burst, copy=False)
        self._outbox = transport.Outbox(self._flush)
        log.info(
            "scheduler listening at %s with %d model(s) in %s",
            self.endpoint,
            len(self.models),
            ", ".join(map(str, self.repositories)),
        )
        watchdog = asyncio.create_task(self._watch_hosts())
        try:
            await self._stopping.wait()
        finally:
            watchdog.cancel()
            self._monitor.close()
            self._driver.close()

    def stop(self) -> None:
        self._stopping.set()

    # --- inbound ----------------------------------------------------------------------

    def _on_burst(self, burst: list[list]) -> None:
        touched: set[tuple[str, str]] = set()
        now = time.monotonic()
        for frames in burst:
            identity = frames[0].bytes
            try:
                msg = self._decode(frames[1].buffer)
            except (msgspec.DecodeError, IndexError) as exc:
                log.warning("dropping an undecodable message: %s", exc)
                continue
            host = self.hosts.get(identity)
            if host is not None:
                host.last_seen = now
            if isinstance(msg, m.InferBatch):
                self._on_infer(identity, msg, frames, touched)
            elif isinstance(msg, m.Completion):
                self._on_completion(msg, touched)
            elif isinstance(msg, m.Heartbeat):
                hb_host = self.hosts_by_id.get(msg.host_id)
                if hb_host is not None:
                    hb_host.last_seen = now
                else:
                    self._send(msg.host_id.encode(), m.Rejoin())
            elif isinstance(msg, m.Query):
                self._send(identity, self._answer(msg))
            elif isinstance(msg, m.HostHello):
                self._on_host_hello(identity, msg, now, touched, frames[1].get(zmq.SRCFD))
            elif isinstance(msg, m.LoadResult):
                self._on_load_result(identity, msg, touched)
            elif isinstance(msg, m.FrontendHello):
                log.info("frontend joined; replies go to %s", msg.reply_endpoint)
        for key in touched:
            self._dispatch(key)

    def _on_infer(self, identity: bytes, batch: m.InferBatch, frames: list, touched: set) -> None:
        for req in batch.requests:
            buffers = [
                frames[t.ref.frame + 1] if isinstance(t.ref, m.Inline) else None for t in req.inputs
            ]
            try:
                model = self.models.get(req.model)
                if model is None:
                    raise not_found(f"Request for unknown model: '{req.model}' is not found")
                version = validate.resolve_version(model, req.version)
                validate.check_request(model, req, buffers)
            except ServerError as exc:
                self._reply_error(identity, batch.reply_to, req, exc)
                continue
            except IndexError:
                self._reply_error(
                    identity, batch.reply_to, req, unavailable("malformed request message")
                )
                continue
            req.version = version
            req.reply_to = batch.reply_to
            key = (req.model, version)
            self.schedulers[key].enqueue(Pending(identity, req, buffers))
            touched.add(key)

    def _on_completion(self, msg: m.Completion, touched: set) -> None:
        for model, version, _instance, sids in msg.done:
            slot = None
            for sid in sids:
                entry = self.inflight.pop(sid, None)
                if entry is not None:
                    slot = entry.slot
            if slot is not None:
                sched = self.schedulers.get((model, version))
                if sched is not None:
                    sched.completed(slot, len(sids))
                    touched.add((model, version))

    # --- dispatch ---------------------------------------------------------------------

    def _dispatch(self, key: tuple[str, str]) -> None:
        sched = self.schedulers[key]
        assert self._outbox is not None
        for slot, pendings in sched.next_batches():
            self._outbox.put(slot.host_identity, (slot, pendings))

    def _flush(self, pending: dict) -> None:
        """Send everything one wake produced: one message per peer."""
        assert self._driver is not None
        for identity, items in pending.items():
            frames = transport.FrameList()
            executions: list[m.Execution] = []
            replies: list[m.InferReply] = []
            for item in items:
                if isinstance(item, m.InferReply):
                    replies.append(item)
                    continue
                slot, pendings = item
                requests = []
                for p in pendings:
                    req = p.request
                    for tensor, buf in zip(req.inputs, p.buffers):
                        if buf is not None:
                            tensor.ref = m.Inline(frames.add(buf))
                    req.sid = sid = self._next_sid
                    self._next_sid += 1
                    self.inflight[sid] = InFlight(p.frontend, req.reply_to, req.rid, slot)
                    requests.append(req)
                executions.append(m.Execution(slot.model, slot.version, slot.index, requests))
            if executions:
                header = self._encode(m.ExecuteBatch(executions))
                if not self._driver.send([identity, *frames.finish(header)]):
                    self._fail_executions(executions, "the backend host is not reachable")
            if replies:
                self._driver.send([identity, self._encode(m.ReplyBatch(replies))])

    def _fail_executions(self, executions: list[m.Execution], why: str) -> None:
        for execution in executions:
            for req in execution.requests:
                entry = self.inflight.pop(req.sid, None)
                if entry is not None:
                    entry.slot.busy = max(0, entry.slot.busy - 1)
                    self._reply_error(entry.frontend, entry.reply_to, req, unavailable(why))

    def _reply_error(self, frontend: bytes, reply_to: str, req: m.Infer, exc: ServerError) -> None:
        assert self._outbox is not None
        self._outbox.put(
            frontend,
            m.InferReply(req.rid, req.model, req.version, [], m.Error(exc.code.value, exc.message)),
        )

    # --- control plane --------------------------------------------------------------------

    def _answer(self, q: m.Query) -> m.QueryReply:
        try:
            body = self._answer_body(q)
        except ServerError as exc:
            return m.QueryReply(q.qid, b"", m.Error(exc.code.value, exc.message))
        return m.QueryReply(q.qid, body)

    def _answer_body(self, q: m.Query) -> bytes:
        if q.kind == "server_ready":
            waiting = [
                f"{mv.name}:{mv.version}"
                for model in self.models.values()
                for mv in model.versions.values()
                if mv.state is State.LOADING
                or (mv.state is State.UNAVAILABLE and not mv.reason.startswith("load failed"))
            ]
            if waiting:
                raise unavailable(f"models not ready yet: {', '.join(waiting)}")
            return b""
        if q.kind == "repository_index":
            return orjson.dumps(self._index())
        model = self.models.get(q.model)
        if model is None:
            raise not_found(f"Request for unknown model: '{q.model}' is not found")
        if q.kind == "model_ready":
            validate.resolve_version(model, q.version)
            return b""
        if q.kind == "model_metadata":
            validate.resolve_version(model, q.version)
            return model.metadata_json()
        if q.kind == "model_config":
            validate.resolve_version(model, q.version)
            return model.config_json
        raise ServerError(Code.UNSUPPORTED, f"unknown query '{q.kind}'")

    def _index(self) -> list[dict]:
        entries: list[dict] = []
        for model in self.models.values():
            if not model.versions:
                entries.append(
                    {"name": model.name, "state": State.UNAVAILABLE.value, "reason": model.error}
                )
            for mv in model.versions.values():
                entries.append(
                    {
                        "name": model.name,
                        "version": mv.version,
                        "state": mv.state.value,
                        "reason": mv.reason,
                    }
                )
        return entries

    # --- backend hosts and placement ----------------------------------------------------------

    def _on_monitor(self, burst: list[list]) -> None:
        for frames in burst:
            event = zmq_monitor.parse_monitor_message(frames)
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            for host in [h for h in self.hosts.values() if h.fd == event["value"]]:
                self._host_gone(host, "its connection closed")

    def _send(self, identity: bytes, msg: msgspec.Struct) -> None:
        assert self._driver is not None
        self._driver.send([identity, self._encode(msg)])

    def _on_host_hello(
        self, identity: bytes, hello: m.HostHello, now: float, touched: set, fd: int
    ) -> None:
        if hello.protocol != m.PROTOCOL_VERSION:
            log.error(
                "backend host %s speaks protocol %d, this scheduler %d: ignoring it",
                hello.host_id,
                hello.protocol,
                m.PROTOCOL_VERSION,
            )
            return
        old = self.hosts_by_id.get(hello.host_id)
        if old is not None and old.identity != identity:
            self._host_gone(old, "it re-registered")
        host = Host(
            identity, hello.host_id, hello.framework, hello.pid, now, hello.instance_of, fd=fd
        )
        self.hosts[identity] = host
        self.hosts_by_id[hello.host_id] = host
        if hello.instance_of is None:
            log.info(
                "backend host %s (%s, pid %d) joined", hello.host_id, hello.framework, hello.pid
            )
            self._place()
            return
        model_name, version, index = hello.instance_of
        mv = self._version(model_name, version)
        if mv is None:
            return
        if hello.load_error:
            self._load_failed(mv, hello.load_error)
            return
        self._add_slots(mv, identity, [index], touched)

    def _on_load_result(self, identity: bytes, res: m.LoadResult, touched: set) -> None:
        mv = self._version(res.model, res.version)
        if mv is None:
            return
        if res.error:
            self._load_failed(mv, res.error)
            return
        if res.instances:
            self._add_slots(mv, identity, res.instances, touched)

    def _add_slots(
        self, mv: ModelVersion, identity: bytes, indexes: list[int], touched: set
    ) -> None:
        key = (mv.name, mv.version)
        sched = self.schedulers[key]
        for index in indexes:
            sched.add_slot(Slot(identity, mv.name, mv.version, index))
        config = self.models[mv.name].config
        assert config is not None
        if sched.slot_count >= instance_count(config) and mv.state is not State.READY:
            mv.state, mv.reason = State.READY, ""
            log.info("successfully loaded '%s' version %s", mv.name, mv.version)
        touched.add(key)

    def _load_failed(self, mv: ModelVersion, error: str) -> None:
        mv.state, mv.reason = State.UNAVAILABLE, f"load failed: {error}"
        log.error("failed to load '%s' version %s: %s", mv.name, mv.version, error)
        for host in self.hosts.values():
            if (mv.name, mv.version) in host.loads:
                host.loads.discard((mv.name, mv.version))
                self._send(host.identity, m.UnloadModel(mv.name, mv.version))

    def _version(self, model: str, version: str) -> ModelVersion | None:
        entry = self.models.get(model)
        return None if entry is None else entry.versions.get(version)

    def _place(self) -> None:
        """Send a LoadModel for every version that has no instances and is waiting for a
        host of its framework."""
        for model in self.models.values():
            if model.config is None:
                continue
            candidates = [
                h
                for h in self.hosts.values()
                if h.framework == model.framework and h.instance_of is None
            ]
            if not candidates:
                continue
            for mv in model.versions.values():
                if mv.state is State.READY or mv.reason.startswith("load failed"):
                    continue
                if any((mv.name, mv.version) in h.loads for h in self.hosts.values()):
                    continue
                host = min(candidates, key=lambda h: len(h.loads))
                host.loads.add((mv.name, mv.version))
                mv.state = State.LOADING
                self._send(
                    host.identity,
                    m.LoadModel(
                        model.name,
                        mv.version,
                        str(model.path),
                        model.config.SerializeToString(),
                        list(range(instance_count(model.config))),
                    ),
                )

    async def _watch_hosts(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            deadline = time.monotonic() - HEARTBEAT_TIMEOUT_S
            for host in [h for h in self.hosts.values() if h.last_seen < deadline]:
                self._host_gone(host, "it stopped answering")

    def _host_gone(self, host: Host, why: str) -> None:
        """Fail what the host was running, drop its instances, and re-place its models."""
        self.hosts.pop(host.identity, None)
        if self.hosts_by_id.get(host.host_id) is host:
            del self.hosts_by_id[host.host_id]
        log.error(
            "backend host %s (%s, pid %d) is gone: %s", host.host_id, host.framework, host.pid, why
        )
        message = (
            f"the backend host running the model ({host.framework}, pid {host.pid}) exited "
            "while the request was in flight"
        )
        for sid, entry in list(self.inflight.items()):
            if entry.slot.host_identity == host.identity:
                del self.inflight[sid]
                assert self._outbox is not None
                self._outbox.put(
                    entry.frontend,
                    m.InferReply(
                        entry.rid,
                        entry.slot.model,
                        entry.slot.version,
                        [],
                        m.Error(Code.UNAVAILABLE.value, message),
                    ),
                )
        for key, sched in self.schedulers.items():
            if not sched.remove_slots(host.identity):
                continue
            mv = self._version(*key)
            if mv is None or sched.slot_count > 0:
                continue
            mv.state, mv.reason = (
                State.UNAVAILABLE,
                f"its backend host ({host.framework}, pid {host.pid}) exited",
            )
            for p in sched.drain_queue():
                self._reply_error(
                    p.frontend,
                    p.request.reply_to,
                    p.request,
                    unavailable(f"model '{key[0]}' lost its instances: {mv.reason}"),
                )
        self._place()
