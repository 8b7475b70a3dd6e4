"""Backend hosts and the model instances placed on them.

A host joins with ``HostHello`` on its stream; the scheduler sends it ``LoadModel`` for
each model version of its framework that waits for instances (the least loaded host
first), and each instance it reports becomes a ``Slot`` of that version's scheduler. A
Python model instance runs in its own process, which joins as a host of one instance.
A host whose stream closes is gone: its in-flight requests fail with UNAVAILABLE at
once, its slots are dropped, and its models are placed again when a host of the same
framework (re)joins.

A model being loaded again while its current load serves (``staging``, filled by
services/scheduler/model_control.py) is placed the same way: its instances carry the
indexes of its generation (``messages.INSTANCE_STRIDE``), so a host, a load result and a
Python instance process each say which load they belong to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from despina.common import messages as m
from despina.common.errors import unavailable
from despina.common.model_config import instance_count
from despina.services.scheduler import autocomplete
from despina.services.scheduler.dispatch import DROPPED, Dispatcher, HostStream
from despina.services.scheduler.interface import ModelScheduler, Slot
from despina.services.scheduler.repository import Model, ModelVersion, State

if TYPE_CHECKING:
    from despina.services.scheduler.routes import RoutePublisher

log = logging.getLogger("despina.scheduler")


@dataclass(eq=False)
class Host:
    stream: HostStream  # the host's identity: when it closes, the host is gone
    host_id: str
    framework: str
    pid: int
    instance_of: tuple[str, str, int] | None = None
    loads: set[tuple[str, str, int]] = field(default_factory=set)  # (model, version, generation)


Hosts: TypeAlias = dict[HostStream, Host]


class Placement:
    """Owns the hosts table and decides where model instances load; sets each model
    version's lifecycle state as its instances come and go. Runs on the loop's thread."""

    def __init__(
        self,
        models: dict[str, Model],
        schedulers: dict[tuple[str, str], ModelScheduler],
        hosts: Hosts,
        dispatcher: Dispatcher,
        routes: RoutePublisher,
    ) -> None:
        self.models = models
        self.schedulers = schedulers
        self.hosts = hosts
        self.dispatcher = dispatcher
        self.routes = routes
        self._send = dispatcher.send_host
        # Loads of models that replace a serving load once ready (model_control.py).
        self.staging: dict[str, Model] = {}

    def host_joined(self, stream: HostStream, hello: m.HostHello, touched: set) -> None:
        """A host's first message. Closes a host of another protocol version."""
        if hello.protocol != m.PROTOCOL_VERSION:
            log.error(
                "backend host %s speaks protocol %d, this scheduler %d: closing its connection",
                hello.host_id,
                hello.protocol,
                m.PROTOCOL_VERSION,
            )
            stream.close()
            return
        host = Host(stream, hello.host_id, hello.framework, hello.pid, hello.instance_of)
        self.hosts[stream] = host
        introduce = self.routes.introduction()
        if introduce is not None:
            self._send(stream, introduce)
        if hello.instance_of is None:
            log.info(
                "backend host %s (%s, pid %d) joined", hello.host_id, hello.framework, hello.pid
            )
            self.place()
            return
        model_name, version, index = hello.instance_of
        found = self._version(model_name, version, index // m.INSTANCE_STRIDE)
        if found is None:
            return
        if hello.load_error:
            self._load_failed(*found, hello.load_error)
            return
        self._add_slots(*found, stream, [index], touched)

    def load_result(self, stream: HostStream, res: m.LoadResult, touched: set) -> None:
        if res.instances:
            generation = res.instances[0] // m.INSTANCE_STRIDE
        else:  # a failure, or a Python launcher's answer: the load this host was sent
            host = self.hosts.get(stream)
            loads = host.loads if host is not None else set()
            generation = next(
                (g for name, v, g in loads if (name, v) == (res.model, res.version)), None
            )
        found = self._version(res.model, res.version, generation)
        if found is None:
            return
        if res.error:
            self._load_failed(*found, res.error)
            return
        if res.config:  # the host completed the config (services/scheduler/autocomplete.py)
            why = autocomplete.adopt(found[0], res.config)
            if why:
                self._load_failed(*found, why)
                return
        if res.instances:
            self._add_slots(*found, stream, res.instances, touched)

    def _add_slots(
        self, model: Model, mv: ModelVersion, stream: HostStream, indexes: list[int], touched: set
    ) -> None:
        sched = model.schedulers[mv.version]
        for index in indexes:
            sched.add_slot(Slot(stream, mv.name, mv.version, index))
        assert model.config is not None
        if (
            sched.slot_count >= instance_count(model.config)
            and mv.state in (State.LOADING, State.UNAVAILABLE)  # not while it unloads
            and model.wanted
        ):
            mv.state, mv.reason = State.READY, ""
            log.info("successfully loaded '%s' version %s", mv.name, mv.version)
        touched.add((mv.name, mv.version))
        self.routes.publish()

    def _load_failed(self, model: Model, mv: ModelVersion, error: str) -> None:
        mv.state, mv.reason = State.UNAVAILABLE, f"load failed: {error}"
        log.error("failed to load '%s' version %s: %s", mv.name, mv.version, error)
        self.routes.publish()
        self.stop_instances(model, mv.version)

    def stop_instances(self, model: Model, version: str) -> None:
        """Stop the instances of ``model``'s load of ``version`` wherever they run, and
        forget them: their slots leave its scheduler, and the processes of Python
        instances leave the hosts table (their streams closing is no loss). The caller
        has withdrawn their routes and waited for their requests."""
        key = (model.name, version, model.generation)
        base = model.generation * m.INSTANCE_STRIDE
        indexes = list(range(base, base + instance_count(model.config) if model.config else base))
        for host in list(self.hosts.values()):
            if key in host.loads:
                host.loads.discard(key)
                self._send(host.stream, m.UnloadModel(model.name, version, indexes))
            of = host.instance_of
            if of is not None and of[:2] == key[:2] and of[2] // m.INSTANCE_STRIDE == key[2]:
                del self.hosts[host.stream]
        sched = model.schedulers.get(version)
        if sched is not None:
            for host in {slot.host for slot in getattr(sched, "slots", [])}:
                sched.remove_slots(host)

    def _version(
        self, model: str, version: str, generation: int | None
    ) -> tuple[Model, ModelVersion] | None:
        """The load (serving or staged) a host's message is about, and its version."""
        for entry in (self.staging.get(model), self.models.get(model)):
            if entry is None or (generation is not None and entry.generation != generation):
                continue
            mv = entry.versions.get(version)
            return None if mv is None else (entry, mv)
        return None

    def place(self) -> None:
        """Send a LoadModel for every version that has no instances and is waiting for a
        host of its framework."""
        for model in [*self.models.values(), *self.staging.values()]:
            if model.config is None or not model.wanted:
                continue
            candidates = [
                h
                for h in self.hosts.values()
                if h.framework == model.framework and h.instance_of is None
            ]
            if not candidates:
                continue
            base = model.generation * m.INSTANCE_STRIDE
            for mv in model.versions.values():
                if mv.state in (State.READY, State.UNLOADING) or mv.reason.startswith(
                    "load failed"
                ):
                    continue
                key = (mv.name, mv.version, model.generation)
                if any(key in h.loads for h in self.hosts.values()):
                    continue
                host = min(candidates, key=lambda h: len(h.loads))
                host.loads.add(key)
                mv.state = State.LOADING
                self._send(
                    host.stream,
                    m.LoadModel(
                        model.name,
                        mv.version,
                        str(model.path),
                        model.config.SerializeToString(),
                        list(range(base, base + instance_count(model.config))),
                    ),
                )

    def host_lost(self, stream: HostStream) -> bool:
        """``stream`` closed; False if it was not a host's (a frontend's stream)."""
        host = self.hosts.get(stream)
        if host is None:
            return False
        self._host_gone(host, "its connection closed")
        return True

    def _host_gone(self, host: Host, why: str) -> None:
        """Fail what the host was running, drop its instances, and re-place its models."""
        self.hosts.pop(host.stream, None)
        log.error(
            "backend host %s (%s, pid %d) is gone: %s", host.host_id, host.framework, host.pid, why
        )
        self.dispatcher.fail_host(
            host.stream,
            unavailable(
                f"the backend host running the model ({host.framework}, pid {host.pid}) "
                "exited while the request was in flight"
            ),
        )
        for model in [*self.models.values(), *self.staging.values()]:
            for version, sched in model.schedulers.items():
                if sched.remove_slots(host.stream):
                    self._lost_instances(model, version, sched, host)
        self.routes.publish()
        self.place()

    def _lost_instances(
        self, model: Model, version: str, sched: ModelScheduler, host: Host
    ) -> None:
        """``host`` took instances of ``model``'s ``version`` with it: with none left,
        the version is UNAVAILABLE and its queued requests fail."""
        mv = model.versions.get(version)
        if mv is None or sched.slot_count > 0 or not model.wanted:
            return
        mv.state, mv.reason = (
            State.UNAVAILABLE,
            f"its backend host ({host.framework}, pid {host.pid}) exited",
        )
        for p in sched.drain_queue():
            if p.buffers is DROPPED:
                continue  # answered CANCELLED already
            self.dispatcher.reply_error(
                p.frontend,
                p.request,
                unavailable(f"model '{model.name}' lost its instances: {mv.reason}"),
            )

    def close(self) -> None:
        for stream in list(self.hosts):
            stream.close()
