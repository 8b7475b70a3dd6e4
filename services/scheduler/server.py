"""The scheduler service: a ZeroMQ ROUTER socket for frontends and a stream listener for
backend hosts (a data-plane hop: see common/streams.py).

It moves metadata only. Frontends send batches of requests; the scheduler checks each
against its model's config, queues it on that model version's scheduler, and hands
batches to free instances on the backend hosts, one message per host per wake. Backend
hosts reply to the frontends directly and report completions back here in batches.

Direct routes: a model version that needs no decision here beyond "a free instance"
(Triton's default scheduler, or a plain dynamic batcher, which the backend host applies
to its own queue) is published to every frontend (``Routes``), and each backend host is
introduced to each frontend (``Introduce``); frontends then send such requests straight
to an instance's host, and this process is off their path (one process and two wake-ups
less per request). Sequences, ensembles, the response cache and priority queues stay here.

Failure handling: a request that cannot run gets an error reply to its frontend; a
backend host whose stream closes (it died, or the network dropped it) has its in-flight
requests failed with UNAVAILABLE at once, and its models placed again when a host of the
same framework (re)joins.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import msgspec
import orjson

from despina.common import messages as m
from despina.common import outbox, streams
from despina.common.batching import batch_rules
from despina.common.errors import Code, ServerError, invalid_arg, not_found, unavailable
from despina.common.model_config import ModelConfig, instance_count
from despina.common.shm.regions import RegionRegistry
from despina.common.validate import check_request
from despina.services.scheduler import validate
from despina.services.scheduler.default import DefaultScheduler
from despina.services.scheduler.dynamic_batcher import DynamicBatcher
from despina.services.scheduler.interface import ModelScheduler, Pending, Slot
from despina.services.scheduler.repository import Model, ModelVersion, State, scan

if TYPE_CHECKING:
    from despina.common.transport import SocketDriver

log = logging.getLogger("despina.scheduler")

HostLink: TypeAlias = streams.FramedProtocol
# A frontend is known by its ZeroMQ identity, or by its stream when it uses one.
FrontendId: TypeAlias = bytes | streams.FramedProtocol


# Put in a queued request's ``Pending.buffers`` when its client went away: it was answered
# CANCELLED then, and is skipped when its turn to be sent comes (the queues are the
# per-model schedulers', so the scheduler marks it rather than pulling it out).
_DROPPED: list = []


@dataclass(eq=False)
class Host:
    link: HostLink  # the host's stream is its identity: when it closes, the host is gone
    host_id: str
    framework: str
    pid: int
    instance_of: tuple[str, str, int] | None = None
    loads: set[tuple[str, str]] = field(default_factory=set)


@dataclass(slots=True)
class InFlight:
    frontend: FrontendId
    reply_to: str
    rid: int
    slot: Slot


class SchedulerServer:
    """Owns the repository state, the hosts, the queues and the in-flight table. All
    methods run on the loop's thread."""

    def __init__(
        self,
        endpoint: str,
        host_endpoint: str,
        repositories: list[Path],
        *,
        allow_client_shm: bool = False,
        direct_routes: bool = True,
    ) -> None:
        self.endpoint = endpoint
        self.direct_routes = direct_routes
        self.host_endpoint = host_endpoint
        self.allow_client_shm = allow_client_shm
        self.regions = RegionRegistry()
        self.repositories = repositories
        self.models: dict[str, Model] = scan(repositories)
        self.schedulers: dict[tuple[str, str], ModelScheduler] = {}
        self.hosts: dict[HostLink, Host] = {}
        self.inflight: dict[int, InFlight] = {}
        self.frontends: dict[str, FrontendId] = {}  # reply endpoint -> frontend
        self._routes = m.Routes([])  # what the frontends were last told
        self._next_sid = 1
        self._encode = m.encoder().encode
        self._decode_frontend = m.decoder(m.SchedulerFromFrontend).decode
        self._decode_stream = m.decoder(m.SchedulerFromFrontend | m.SchedulerFromHost).decode
        self._driver: SocketDriver | None = None
        self._outbox: outbox.Outbox | None = None
        self._stopping = asyncio.Event()
        for model in self.models.values():
            for version in model.versions:
                self.schedulers[(model.name, version)] = self._make_scheduler(model, version)

    def _make_scheduler(self, model: Model, version: str) -> ModelScheduler:
        assert model.config is not None
        rules = batch_rules(orjson.loads(model.config_json))
        if rules is not None:
            key = (model.name, version)
            return DynamicBatcher(rules, lambda: self._dispatch(key))
        return DefaultScheduler()

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        if self.endpoint:
            # Imported only here: pyzmq costs ~5 MiB where no frontend speaks ZeroMQ.
            import zmq

            from despina.common import transport

            ctx = transport.make_context()
            sock = transport.configure(ctx.socket(zmq.ROUTER))
            transport.secure(sock, self.endpoint, server=True)
            sock.bind(self.endpoint)
            self._driver = transport.SocketDriver(sock, self._on_frontend_burst)
        self._outbox = outbox.Outbox(self._flush)
        host_server = await streams.serve(
            self.host_endpoint, self._on_stream_burst, self._on_host_lost
        )
        log.info(
            "scheduler listening at %s (frontends) and %s (backend hosts and frontends) "
            "with %d model(s) in %s",
            self.endpoint or "no ZeroMQ endpoint",
            self.host_endpoint,
            len(self.models),
            ", ".join(map(str, self.repositories)),
        )
        try:
            await self._stopping.wait()
        finally:
            host_server.close()
            for link in list(self.hosts):
                link.close()
            if self._driver is not None:
                self._driver.close()

    def stop(self) -> None:
        self._stopping.set()

    # --- inbound ----------------------------------------------------------------------

    def _on_frontend_burst(self, burst: list[list]) -> None:
        """ZeroMQ frontends: frame 0 is the sender's identity."""
        touched: set[tuple[str, str]] = set()
        for frames in burst:
            try:
                msg = self._decode_frontend(frames[1])
            except (msgspec.DecodeError, IndexError) as exc:
                log.warning("dropping an undecodable message from a frontend: %s", exc)
                continue
            self._on_frontend_message(frames[0], msg, frames, touched)
        for key in touched:
            self._dispatch(key)

    def _on_frontend_message(
        self, identity: FrontendId, msg: msgspec.Struct, frames: list, touched: set
    ) -> None:
        """``frames`` has the tensor frames from index 2 (after identity and header)."""
        if isinstance(msg, m.InferBatch):
            self._on_infer(identity, msg, frames, touched)
        elif isinstance(msg, m.Query):
            self._send_frontend(identity, self._answer(msg))
        elif isinstance(msg, m.Cancel):
            self._on_cancel(msg)
        elif isinstance(msg, m.FrontendHello):
            log.info("frontend joined; replies go to %s", msg.reply_endpoint)
            self._frontend_joined(identity, msg.reply_endpoint)

    def _on_stream_burst(self, link: HostLink, burst: list[list]) -> None:
        """Streams carry backend hosts and, when they choose streams, frontends: the
        stream itself identifies the peer."""
        touched: set[tuple[str, str]] = set()
        for frames in burst:
            try:
                msg = self._decode_stream(frames[0])
            except (msgspec.DecodeError, IndexError) as exc:
                log.warning("dropping an undecodable message from a stream peer: %s", exc)
                continue
            if isinstance(msg, (m.InferBatch, m.Query, m.FrontendHello, m.Cancel)):
                self._on_frontend_message(link, msg, [None, *frames], touched)
            elif isinstance(msg, m.Completion):
                self._on_completion(msg, touched)
            elif isinstance(msg, m.HostHello):
                self._on_host_hello(link, msg, touched)
            elif isinstance(msg, m.LoadResult):
                self._on_load_result(link, msg, touched)
        for key in touched:
            self._dispatch(key)

    def _on_host_lost(self, link: HostLink) -> None:
        host = self.hosts.get(link)
        if host is not None:
            self._host_gone(host, "its connection closed")
            return
        for endpoint, frontend in list(self.frontends.items()):
            if frontend is link:
                del self.frontends[endpoint]

    def _on_infer(
        self, identity: FrontendId, batch: m.InferBatch, frames: list, touched: set
    ) -> None:
        if self.frontends.get(batch.reply_to) != identity:
            # A frontend this scheduler has not met (it restarted; ZeroMQ said no hello).
            # ``!=``: a ZeroMQ identity is a new bytes object in every message.
            self._frontend_joined(identity, batch.reply_to)
        for req in batch.requests:
            try:
                buffers = [
                    frames[t.ref.frame + 1] if isinstance(t.ref, m.Inline) else None
                    for t in req.inputs
                ]
                model = self.models.get(req.model)
                if model is None:
                    raise not_found(f"Request for unknown model: '{req.model}' is not found")
                version = validate.resolve_version(model, req.version)
                assert model.signature is not None  # a model with a version has a config
                check_request(model.signature, req, buffers)
                self._resolve_regions(req)
            except ServerError as exc:
                self._reply_error(identity, req, exc)
                continue
            except IndexError:
                self._reply_error(identity, req, unavailable("malformed request message"))
                continue
            req.version = version
            req.reply_to = batch.reply_to
            key = (req.model, version)
            self.schedulers[key].enqueue(Pending(identity, req, buffers))
            touched.add(key)

    def _on_cancel(self, msg: m.Cancel) -> None:
        """A frontend's clients went away: their requests still queued here are answered
        CANCELLED and never sent; those already sent to a host are cancelled there (one
        Cancel per host), which drops them if they have not started. Costs a scan of the
        queues and the in-flight table per Cancel message (at most one per frontend wake)."""
        rids = set(msg.rids)
        reply_to = msg.reply_to
        error = ServerError(Code.CANCELLED, "the request was cancelled before it ran")
        for sched in self.schedulers.values():
            for p in getattr(sched, "queue", ()):
                req = p.request
                if req.rid in rids and req.reply_to == reply_to and p.buffers is not _DROPPED:
                    p.buffers = _DROPPED
                    self._reply_error(p.frontend, req, error)
        sent: dict[HostLink, list[int]] = {}
        for entry in self.inflight.values():
            if entry.rid in rids and entry.reply_to == reply_to:
                sent.setdefault(entry.slot.host, []).append(entry.rid)
        for link, cancelled in sent.items():
            link.send([self._encode(m.Cancel(reply_to, cancelled))])

    def _resolve_regions(self, req: m.Infer) -> None:
        """Client shared-memory regions named by a request -> blocks the hosts map."""
        for tensor in req.inputs:
            ref = tensor.ref
            if isinstance(ref, m.Region):
                tensor.ref = self.regions.resolve(
                    ref.name, ref.offset, ref.size, f"input '{tensor.name}'"
                )
        for name, target in req.output_targets.items():
            if isinstance(target, m.Region):
                req.output_targets[name] = self.regions.resolve(
                    target.name, target.offset, target.size, f"output '{name}'"
                )

    def _on_completion(self, msg: m.Completion, touched: set) -> None:
        for reply_to, rid, model, version in msg.undelivered:
            frontend = self.frontends.get(reply_to)
            if frontend is None:
                continue
            why = unavailable(
                f"the backend host could not send the reply to this frontend at {reply_to}: "
                "check the frontend's advertised reply endpoint"
            )
            self._error_reply(frontend, rid, model, version, why)
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

    # --- dispatch ---------------------------------------------------------------------

    def _dispatch(self, key: tuple[str, str]) -> None:
        sched = self.schedulers[key]
        assert self._outbox is not None
        for slot, pendings in sched.next_batches():
            self._outbox.put(slot.host, (slot, pendings))

    def _flush(self, pending: dict) -> None:
        """Send everything one wake produced: one message per peer. A peer is a
        frontend (ZeroMQ identity or stream), sent replies, or a backend host's stream,
        sent batches."""
        for peer, items in pending.items():
            if isinstance(items[0], m.InferReply):
                self._send_frontend(peer, m.ReplyBatch(items))
                continue
            frames = outbox.FrameList()
            executions: list[m.Execution] = []
            for slot, pendings in items:
                requests = []
                for p in pendings:
                    if p.buffers is _DROPPED:
                        continue  # its client went away while it waited; answered then
                    req = p.request
                    frames.inline(req.inputs, p.buffers)
                    req.sid = sid = self._next_sid
                    self._next_sid += 1
                    self.inflight[sid] = InFlight(p.frontend, req.reply_to, req.rid, slot)
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
            self._dispatch(key)

    def _fail_executions(self, executions: list[m.Execution], why: str) -> None:
        for execution in executions:
            slot = None
            for req in execution.requests:
                entry = self.inflight.pop(req.sid, None)
                if entry is not None:
                    slot = entry.slot
                    self._reply(entry, unavailable(why))
            if slot is not None:
                slot.busy = max(0, slot.busy - 1)

    def _error_reply(
        self, frontend: FrontendId, rid: int, model: str, version: str, exc: ServerError
    ) -> None:
        """Answer one request with an error, in this wake's message to its frontend."""
        assert self._outbox is not None
        error = m.Error(exc.code.value, exc.message)
        self._outbox.put(frontend, m.InferReply(rid, model, version, [], error))

    def _reply_error(self, frontend: FrontendId, req: m.Infer, exc: ServerError) -> None:
        self._error_reply(frontend, req.rid, req.model, req.version, exc)

    def _reply(self, entry: InFlight, exc: ServerError) -> None:
        self._error_reply(entry.frontend, entry.rid, entry.slot.model, entry.slot.version, exc)

    def _send_frontend(self, identity: FrontendId, msg: msgspec.Struct) -> None:
        if isinstance(identity, bytes):
            assert self._driver is not None
            self._driver.send([identity, self._encode(msg)])
        else:
            identity.send([self._encode(msg)])

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
        if q.kind.startswith(("shm_", "cuda_shm_")):
            return self._answer_shm(q)
        model = self.models.get(q.model)
        if model is None:
            raise not_found(f"Request for unknown model: '{q.model}' is not found")
        validate.resolve_version(model, q.version)
        if q.kind == "model_ready":
            return b""
        if q.kind == "model_metadata":
            return model.metadata_json()
        if q.kind == "model_config":
            return model.config_json
        raise ServerError(Code.UNSUPPORTED, f"unknown query '{q.kind}'")

    def _answer_shm(self, q: m.Query) -> bytes:
        cuda = q.kind.startswith("cuda_")
        kind = q.kind.removeprefix("cuda_")
        if kind == "shm_status":
            return orjson.dumps(
                self.regions.cuda_status(q.model) if cuda else self.regions.status(q.model)
            )
        if kind == "shm_unregister":
            if cuda:
                self.regions.unregister_cuda(q.model)
            else:
                self.regions.unregister(q.model)
            return b""
        if not self.allow_client_shm:
            raise ServerError(
                Code.UNAVAILABLE,
                "client shared memory is disabled on this server: start it with "
                "--allow-client-shm=true to let clients register regions",
            )
        try:
            args = orjson.loads(q.body)
            name = args["name"]
            byte_size = int(args["byte_size"])
            if cuda:
                handle = base64.b64decode(args["raw_handle"]["b64"], validate=True)
                device_id = int(args.get("device_id", 0))
            else:
                key, offset = args["key"], int(args.get("offset", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
            spelled = (
                "'raw_handle': {'b64': ...}, 'device_id' and 'byte_size'"
                if cuda
                else "'key' (string), 'offset' and 'byte_size' (integers)"
            )
            raise invalid_arg(f"a shared memory registration needs {spelled}: {exc}") from None
        if not isinstance(name, str) or (not cuda and not isinstance(key, str)):
            raise invalid_arg("shared memory region name and key must be strings")
        if cuda:
            self.regions.register_cuda(name, handle, device_id, byte_size)
            log.info("registered CUDA shared memory region '%s' on device %d", name, device_id)
        else:
            self.regions.register(name, key, offset, byte_size)
            log.info("registered system shared memory region '%s' (%s)", name, key)
        return b""

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

    def _send_host(self, host: Host, msg: msgspec.Struct) -> None:
        host.link.send([self._encode(msg)])

    def _on_host_hello(self, link: HostLink, hello: m.HostHello, touched: set) -> None:
        if hello.protocol != m.PROTOCOL_VERSION:
            log.error(
                "backend host %s speaks protocol %d, this scheduler %d: closing its connection",
                hello.host_id,
                hello.protocol,
                m.PROTOCOL_VERSION,
            )
            link.close()
            return
        host = Host(link, hello.host_id, hello.framework, hello.pid, hello.instance_of)
        self.hosts[link] = host
        if self.direct_routes and self.frontends:
            self._send_host(host, m.Introduce(list(self.frontends)))
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
        self._add_slots(mv, link, [index], touched)

    def _on_load_result(self, link: HostLink, res: m.LoadResult, touched: set) -> None:
        mv = self._version(res.model, res.version)
        if mv is None:
            return
        if res.error:
            self._load_failed(mv, res.error)
            return
        if res.instances:
            self._add_slots(mv, link, res.instances, touched)

    def _add_slots(
        self, mv: ModelVersion, link: HostLink, indexes: list[int], touched: set
    ) -> None:
        key = (mv.name, mv.version)
        sched = self.schedulers[key]
        for index in indexes:
            sched.add_slot(Slot(link, mv.name, mv.version, index))
        config = self.models[mv.name].config
        assert config is not None
        if sched.slot_count >= instance_count(config) and mv.state is not State.READY:
            mv.state, mv.reason = State.READY, ""
            log.info("successfully loaded '%s' version %s", mv.name, mv.version)
        touched.add(key)
        self._publish_routes()

    def _load_failed(self, mv: ModelVersion, error: str) -> None:
        mv.state, mv.reason = State.UNAVAILABLE, f"load failed: {error}"
        log.error("failed to load '%s' version %s: %s", mv.name, mv.version, error)
        self._publish_routes()
        for host in self.hosts.values():
            if (mv.name, mv.version) in host.loads:
                host.loads.discard((mv.name, mv.version))
                self._send_host(host, m.UnloadModel(mv.name, mv.version))

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
                self._send_host(
                    host,
                    m.LoadModel(
                        model.name,
                        mv.version,
                        str(model.path),
                        model.config.SerializeToString(),
                        list(range(instance_count(model.config))),
                    ),
                )

    def _host_gone(self, host: Host, why: str) -> None:
        """Fail what the host was running, drop its instances, and re-place its models."""
        self.hosts.pop(host.link, None)
        log.error(
            "backend host %s (%s, pid %d) is gone: %s", host.host_id, host.framework, host.pid, why
        )
        died = unavailable(
            f"the backend host running the model ({host.framework}, pid {host.pid}) exited "
            "while the request was in flight"
        )
        for sid, entry in list(self.inflight.items()):
            if entry.slot.host is host.link:
                del self.inflight[sid]
                self._reply(entry, died)
        for key, sched in self.schedulers.items():
            if not sched.remove_slots(host.link):
                continue
            mv = self._version(*key)
            if mv is None or sched.slot_count > 0:
                continue
            mv.state, mv.reason = (
                State.UNAVAILABLE,
                f"its backend host ({host.framework}, pid {host.pid}) exited",
            )
            for p in sched.drain_queue():
                if p.buffers is _DROPPED:
                    continue  # answered CANCELLED already
                self._reply_error(
                    p.frontend,
                    p.request,
                    unavailable(f"model '{key[0]}' lost its instances: {mv.reason}"),
                )
        self._publish_routes()
        self._place()

    # --- direct routes ---------------------------------------------------------------------

    def _frontend_joined(self, identity: FrontendId, reply_endpoint: str) -> None:
        """Remember the frontend, give it the routes, and introduce the hosts to it."""
        self.frontends[reply_endpoint] = identity
        if not self.direct_routes:
            return
        self._send_frontend(identity, self._routes)
        introduce = self._encode(m.Introduce([reply_endpoint]))
        for host in self.hosts.values():
            host.link.send([introduce])

    def _publish_routes(self) -> None:
        """Tell every frontend the direct routes, when they changed."""
        if not self.direct_routes:
            return
        routes = m.Routes([])
        for model in self.models.values():
            if model.config is None or model.signature is None:
                continue
            if _needs_scheduler(model.config):
                continue
            default = model.default_version()
            for version, mv in model.versions.items():
                sched = self.schedulers[(model.name, version)]
                if mv.state is not State.READY or not isinstance(sched, DefaultScheduler):
                    continue
                instances = [
                    (self.hosts[slot.host].host_id, slot.index)
                    for slot in sched.slots
                    if slot.host in self.hosts
                ]
                if instances:
                    routes.routes.append(
                        m.Route(model.name, version, version == default, model.signature, instances)
                    )
        if routes == self._routes:
            return
        self._routes = routes
        for frontend in self.frontends.values():
            self._send_frontend(frontend, routes)


def _needs_scheduler(config: ModelConfig) -> bool:
    """What only the scheduler can do for a model: order sequences, walk an ensemble,
    answer from the response cache, queue by priority or with queue policies. Plain
    dynamic batching is not on the list: a backend host batches its direct requests by
    the same rules (worker.LocalBatcher)."""
    batching = config.dynamic_batching
    return (
        config.HasField("sequence_batching")
        or config.HasField("ensemble_scheduling")
        or config.platform == "ensemble"
        or config.response_cache.enable
        or batching.priority_levels > 0
        or batching.HasField("default_queue_policy")
        or len(batching.priority_queue_policy) > 0
    )
