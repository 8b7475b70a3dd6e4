"""The scheduler service: a ZeroMQ ROUTER socket for frontends and a stream listener for
backend hosts (a data-plane hop: see common/streams.py).

It moves metadata only. Frontends send batches of requests; the scheduler checks each
against its model's config, queues it on that model version's scheduler, and hands
batches to free instances on the backend hosts, one message per host per wake. Backend
hosts reply to the frontends directly and report completions back here in batches.

This module wires the parts and routes what comes in to them:
  dispatch.Dispatcher     batches out to hosts, the in-flight table, error replies
  placement.Placement     hosts, where model instances load, a host gone
  control.ControlAnswers  answers to control queries, as typed records
  routes.RoutePublisher   the frontends, and the direct routes they are told

Failure handling: a request that cannot run gets an error reply to its frontend; a
backend host whose stream closes, or that stops sending heartbeats (liveness.Liveness),
is gone: its in-flight requests are sent once more to another instance or fail with
UNAVAILABLE at once, the frontends are told, and its models are placed again when a
host of the same framework (re)joins.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import orjson

from despina.common import messages as m
from despina.common import streams, trace_stamps
from despina.common.batching import batch_rules
from despina.common.errors import ServerError, not_found, unavailable
from despina.common.settings import ProcessSettings, SpeedPaths
from despina.common.shm.regions import RegionRegistry
from despina.common.validate import check_request
from despina.services.scheduler import validate
from despina.services.scheduler.control import ControlAnswers
from despina.services.scheduler.default import DefaultScheduler
from despina.services.scheduler.dispatch import Dispatcher, FrontendId, HostStream
from despina.services.scheduler.dynamic_batcher import DynamicBatcher
from despina.services.scheduler.interface import ModelScheduler, Pending
from despina.services.scheduler.liveness import Liveness
from despina.services.scheduler.model_control import ControlSettings, ModelControl
from despina.services.scheduler.placement import Hosts, Placement
from despina.services.scheduler.repository import Model
from despina.services.scheduler.routes import RoutePublisher
from despina.services.scheduler.settings_store import SettingsStore
from despina.services.scheduler.stats import StatsTotals

log = logging.getLogger("despina.scheduler")


class SchedulerServer:
    """Owns the sockets, the models and their per-model schedulers, and the parts above;
    decodes what arrives and hands each message to its part. All methods run on the
    loop's thread."""

    def __init__(
        self,
        endpoint: str,
        host_endpoint: str,
        repositories: list[Path],
        *,
        allow_client_shm: bool = False,
        speed: SpeedPaths | None = None,
        control: ControlSettings | None = None,
        settings: SettingsStore | None = None,
        instance_placement: str = "per-host",
        heartbeat_timeout_s: float = 0.0,
    ) -> None:
        """``speed``: the speed paths (direct routes, burst sends); default all on.
        ``control``: model control (mode, models to load, polling); default mode none.
        ``instance_placement``: placement.PER_HOST or placement.SPREAD.
        ``heartbeat_timeout_s``: a host silent this long is gone (liveness.py); 0: only
        a host whose stream closes."""
        control = control or ControlSettings()
        # The logging and trace settings (settings_store.py), from the flags.
        self.settings = settings or SettingsStore()
        # Some trace level is on: traced requests get their QUEUE_START here.
        self.tracing = trace_stamps.tracing(self.settings.trace)
        speed = speed or SpeedPaths()
        self.endpoint = endpoint
        self.host_endpoint = host_endpoint
        self.repositories = repositories
        self.models: dict[str, Model] = {}
        self.schedulers: dict[tuple[str, str], ModelScheduler] = {}
        # Reads the repositories into models and schedulers (model_control.py).
        self.model_control = ModelControl(
            repositories, control, self.models, self.schedulers, self._make_scheduler
        )
        self.hosts: Hosts = {}
        self.regions = RegionRegistry()
        self.dispatcher = Dispatcher(self.schedulers, burst=speed.burst)
        self.routes = RoutePublisher(
            self.models,
            self.schedulers,
            self.hosts,
            self.dispatcher.send_frontend,
            enabled=speed.direct_routes,
        )
        self.dispatcher.frontends = self.routes.frontends
        self.placement = Placement(
            self.models,
            self.schedulers,
            self.hosts,
            self.dispatcher,
            self.routes,
            instance_placement,
        )
        self.model_control.attach(self.placement, self.routes, self.dispatcher, self.stop)
        self.liveness = Liveness(self.hosts, self.placement.host_silent, heartbeat_timeout_s)
        self.control = ControlAnswers(
            self.models,
            self.regions,
            allow_client_shm=allow_client_shm,
            strict_readiness=control.strict_readiness,
            unloaded=self.model_control.unloaded_names,
        )
        # Every frontend's and host's StatsReport added up (the statistics extension, /metrics).
        self.stats = StatsTotals(
            lambda: self.models,
            self.schedulers,
            ProcessSettings.from_environ().statistics,
            reply=self.dispatcher.send_frontend,
            flush=self._to_every_process,
        )
        # Bound once: called per request or per burst.
        self._dispatch = self.dispatcher.dispatch
        self._reply_error = self.dispatcher.reply_error
        self._decode_frontend = m.decoder(m.SchedulerFromFrontend).decode
        self._decode_stream = m.decoder(m.SchedulerFromFrontend | m.SchedulerFromHost).decode
        self._stopping = asyncio.Event()

    def _make_scheduler(self, model: Model, version: str) -> ModelScheduler:
        assert model.config is not None and model.config_record is not None
        rules = batch_rules(orjson.loads(model.config_record.json))
        if rules is not None:
            key = (model.name, version)
            return DynamicBatcher(rules, lambda: self._dispatch(key))
        return DefaultScheduler()

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        driver = None
        if self.endpoint:
            # Imported only here: pyzmq costs memory where no frontend speaks ZeroMQ.
            import zmq

            from despina.common import transport

            ctx = transport.make_context()
            sock = transport.configure(ctx.socket(zmq.ROUTER))
            transport.secure(sock, self.endpoint, server=True)
            sock.bind(self.endpoint)
            driver = transport.SocketDriver(sock, self._on_frontend_burst)
        self.dispatcher.start(driver)
        self.model_control.start()
        self.liveness.start()
        host_server = await streams.serve(
            self.host_endpoint, self._on_stream_burst, self._on_stream_lost
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
            self.liveness.close()
            self.model_control.close()
            self.placement.close()
            self.dispatcher.close()

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
            log.debug("query %s '%s' version '%s'", msg.kind, msg.model, msg.version)
            if msg.kind in ("log_settings", "trace_setting"):
                self._on_settings_query(identity, msg)
            elif msg.kind == "statistics":  # answered once every reporter flushed
                self.stats.ask(identity, msg)
            elif msg.kind in ("repository_load", "repository_unload"):  # answered once done
                self.model_control.request(self.dispatcher.send_frontend, identity, msg)
            else:
                self.dispatcher.send_frontend(identity, self.control.answer(msg))
        elif isinstance(msg, m.Cancel):
            self.dispatcher.cancel(msg)
        elif isinstance(msg, m.StatsReport):
            self.stats.report(msg, identity)
        elif isinstance(msg, m.FrontendHello):
            log.info("frontend joined; replies go to %s", msg.reply_endpoint)
            self.routes.frontend_joined(identity, msg.reply_endpoint)
            self.dispatcher.send_frontend(identity, self.settings.message())

    def _on_stream_burst(self, stream: HostStream, burst: list[list]) -> None:
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
                self._on_frontend_message(stream, msg, [None, *frames], touched)
            elif isinstance(msg, m.StatsReport):
                self.stats.report(msg, stream)
            elif isinstance(msg, m.Completion):
                self.dispatcher.completed(msg, touched)
            elif isinstance(msg, m.HostHello):
                self.placement.host_joined(stream, msg, touched)
                if stream in self.hosts:
                    self.dispatcher.send_host(stream, self.settings.message())
            elif isinstance(msg, m.LoadResult):
                self.placement.load_result(stream, msg, touched)
            elif isinstance(msg, m.Heartbeat):
                self.liveness.beat(msg.host_id)
        for key in touched:
            self._dispatch(key)

    def _to_every_process(self, msg: msgspec.Struct) -> set:
        """``msg`` to every frontend and backend host (Python instance processes and
        launchers included); their keys (the identity or stream their messages arrive
        with)."""
        peers: set = set()
        for frontend in list(self.routes.frontends.values()):
            self.dispatcher.send_frontend(frontend, msg)
            peers.add(frontend)
        for stream in list(self.hosts):
            self.dispatcher.send_host(stream, msg)
            peers.add(stream)
        return peers

    def _on_settings_query(self, identity: FrontendId, q: m.Query) -> None:
        """Answer a logging / trace settings query; a change is applied here and sent to
        every frontend and backend host (Python instance processes included) at once."""
        reply, changed = self.settings.answer(q)
        if changed:  # the store applied a logging change to this process already
            self.tracing = trace_stamps.tracing(self.settings.trace)
            self._to_every_process(self.settings.message())
        self.dispatcher.send_frontend(identity, reply)

    def _on_stream_lost(self, stream: HostStream) -> None:
        if not self.placement.host_lost(stream):
            self.routes.frontend_lost(stream)

    def _on_infer(
        self, identity: FrontendId, batch: m.InferBatch, frames: list, touched: set
    ) -> None:
        if self.routes.frontends.get(batch.reply_to) != identity:
            # A frontend this scheduler has not met (it restarted; ZeroMQ said no hello).
            # ``!=``: a ZeroMQ identity is a new bytes object in every message.
            self.routes.frontend_joined(identity, batch.reply_to)
        if self.tracing:
            trace_stamps.stamp(batch.requests, "QUEUE_START")
        models = self.models
        schedulers = self.schedulers
        if log.isEnabledFor(logging.DEBUG):  # --log-verbose: one line per burst of requests
            log.debug(
                "requests from %s: %s",
                batch.reply_to,
                ", ".join(f"{r.model} id '{r.request_id}'" for r in batch.requests),
            )
        for req in batch.requests:
            try:
                buffers = [
                    frames[t.ref.frame + 1] if isinstance(t.ref, m.Inline) else None
                    for t in req.inputs
                ]
                model = models.get(req.model)
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
            schedulers[key].enqueue(Pending(identity, req, buffers))
            touched.add(key)

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
