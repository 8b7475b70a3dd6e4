"""Backend hosts and the model instances placed on them.

A host joins with ``HostHello`` on its stream; the scheduler sends it ``LoadModel`` for
each model version of its framework that waits for instances (the least loaded host
first), and each instance it reports becomes a ``Slot`` of that version's scheduler. A
Python model instance runs in its own process, which joins as a host of one instance.
A host whose stream closes is gone: its in-flight requests fail with UNAVAILABLE at
once, its slots are dropped, and its models are placed again when a host of the same
framework (re)joins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from despina.common import messages as m
from despina.common.errors import unavailable
from despina.common.model_config import instance_count
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
    loads: set[tuple[str, str]] = field(default_factory=set)


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
        mv = self._version(model_name, version)
        if mv is None:
            return
        if hello.load_error:
            self._load_failed(mv, hello.load_error)
            return
        self._add_slots(mv, stream, [index], touched)

    def load_result(self, stream: HostStream, res: m.LoadResult, touched: set) -> None:
        mv = self._version(res.model, res.version)
        if mv is None:
            return
        if res.error:
            self._load_failed(mv, res.error)
            return
        if res.instances:
            self._add_slots(mv, stream, res.instances, touched)

    def _add_slots(
        self, mv: ModelVersion, stream: HostStream, indexes: list[int], touched: set
    ) -> None:
        key = (mv.name, mv.version)
        sched = self.schedulers[key]
        for index in indexes:
            sched.add_slot(Slot(stream, mv.name, mv.version, index))
        config = self.models[mv.name].config
        assert config is not None
        if sched.slot_count >= instance_count(config) and mv.state is not State.READY:
            mv.state, mv.reason = State.READY, ""
            log.info("successfully loaded '%s' version %s", mv.name, mv.version)
        touched.add(key)
        self.routes.publish()

    def _load_failed(self, mv: ModelVersion, error: str) -> None:
        mv.state, mv.reason = State.UNAVAILABLE, f"load failed: {error}"
        log.error("failed to load '%s' version %s: %s", mv.name, mv.version, error)
        self.routes.publish()
        for host in self.hosts.values():
            if (mv.name, mv.version) in host.loads:
                host.loads.discard((mv.name, mv.version))
                self._send(host.stream, m.UnloadModel(mv.name, mv.version))

    def _version(self, model: str, version: str) -> ModelVersion | None:
        entry = self.models.get(model)
        return None if entry is None else entry.versions.get(version)

    def place(self) -> None:
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
                    host.stream,
                    m.LoadModel(
                        model.name,
                        mv.version,
                        str(model.path),
                        model.config.SerializeToString(),
                        list(range(instance_count(model.config))),
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
        for key, sched in self.schedulers.items():
            if not sched.remove_slots(host.stream):
                continue
            mv = self._version(*key)
            if mv is None or sched.slot_count > 0:
                continue
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
                    unavailable(f"model '{key[0]}' lost its instances: {mv.reason}"),
                )
        self.routes.publish()
        self.place()

    def close(self) -> None:
        for stream in list(self.hosts):
            stream.close()
