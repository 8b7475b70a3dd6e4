"""Backend hosts and the model instances placed on them.

A host joins with ``HostHello`` on its stream; the scheduler sends it ``LoadModel`` for
the model versions of its framework as the placement policy says, and each instance it
reports becomes a ``Slot`` of that version's scheduler. A Python model instance runs in
its own process, which joins as a host of one instance. A host whose stream closes is
gone: its in-flight requests fail with UNAVAILABLE at once and its slots are dropped.

The policy (``--instance-placement``, docs/deployment.md "Placing instances"):

- ``per-host`` (the default): a model's ``instance_group`` count is per backend host, as
  Triton's is per GPU. Every host of the model's framework loads ``count`` instances, so
  a host that joins adds capacity to every model at once; a version is READY once
  ``count`` instances serve (the first host's), and stays READY while any host holds
  instances of it.
- ``spread``: ``count`` is the total over the framework's hosts. Missing instances go to
  the hosts holding fewest of the version's instances; a host that leaves has its
  instances placed again on the others. When a version's hosts differ by two instances
  or more (a host joined), instances move: the new one loads on the host with fewest,
  and once it serves the old one leaves the routes and the scheduler's slots, and
  unloads MOVE_GRACE_S later (as a reload's old instances do).

Instance indexes are unique per load across hosts: a load's indexes come in blocks of
``count`` from ``generation * messages.INSTANCE_STRIDE``, a block per placement (per
host in ``per-host``), never reused within the generation; ``index % count`` is the
instance's place in its instance groups. Past ``INSTANCE_STRIDE`` indexes a load places
no more instances (logged) until the model is loaded again.

A model being loaded again while its current load serves (``staging``, filled by
services/scheduler/model_control.py) is placed the same way: its instances carry the
indexes of its generation (``messages.INSTANCE_STRIDE``), so a host, a load result and a
Python instance process each say which load they belong to.
"""

from __future__ import annotations

import asyncio
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

PER_HOST = "per-host"
SPREAD = "spread"
POLICIES = (PER_HOST, SPREAD)

LoadKey: TypeAlias = tuple[str, str, int]  # (model, version, generation)
# A moved instance leaves the routes, then unloads this much later: frontends have the
# routes without it and the direct requests sent before them have finished.
MOVE_GRACE_S = 1.0


@dataclass(eq=False)
class Host:
    stream: HostStream  # the host's identity: when it closes, the host is gone
    host_id: str
    framework: str
    pid: int
    instance_of: tuple[str, str, int] | None = None
    # The instance indexes this host was sent for each load (its LoadModel's).
    loads: dict[LoadKey, list[int]] = field(default_factory=dict)
    # Loads that failed on this host while others served them: not sent here again.
    failed: set[LoadKey] = field(default_factory=set)


Hosts: TypeAlias = dict[HostStream, Host]
# A placement: a host, the instance positions it loads, and for each the (host, index)
# it replaces (a move) or None.
Plan: TypeAlias = tuple[Host, list[int], list[tuple[Host, int] | None]]
Move: TypeAlias = tuple[Host, Host, int]  # to this host, from this host's index


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
        policy: str = PER_HOST,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown instance placement {policy!r} (one of {POLICIES})")
        self.policy = policy
        self.models = models
        self.schedulers = schedulers
        self.hosts = hosts
        self.dispatcher = dispatcher
        self.routes = routes
        self._send = dispatcher.send_host
        # Loads of models that replace a serving load once ready (model_control.py).
        self.staging: dict[str, Model] = {}
        # Blocks of ``count`` indexes handed out per load (see the module's docstring).
        self._blocks: dict[LoadKey, int] = {}
        # Spread's moves under way: (load, new index) -> (the host loading it, the host
        # and index it replaces).
        self._moves: dict[tuple[LoadKey, int], Move] = {}

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
            if found[1].state is State.READY:  # other instances serve: this one is lost
                log.error(
                    "instance %d of '%s' version %s failed to load: %s",
                    index,
                    model_name,
                    version,
                    hello.load_error,
                )
                return
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
            host = self.hosts.get(stream)
            if found[1].state is State.READY and host is not None:
                self._failed_on(host, found[0], found[1], res.error)
            else:
                self._load_failed(*found, res.error)
            return
        if res.config:  # the host completed the config (services/scheduler/autocomplete.py)
            why = autocomplete.adopt(found[0], res.config)
            if why:
                self._load_failed(*found, why)
                return
        host = self.hosts.get(stream)
        if host is not None:  # not those unloaded meanwhile (moved, failed here)
            held = host.loads.get((res.model, res.version, found[0].generation), ())
            res.instances = [i for i in res.instances if i in held]
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
        if self._moves:
            key = (mv.name, mv.version, model.generation)
            for index in indexes:
                move = self._moves.pop((key, index), None)
                if move is not None:
                    self._retire_moved(model, mv.version, key, move[1], move[2])

    def _retire_moved(
        self, model: Model, version: str, key: LoadKey, host: Host, index: int
    ) -> None:
        """The instance that replaces ``host``'s ``index`` serves: take ``index`` off the
        scheduler's slots and the routes now, unload it MOVE_GRACE_S later."""
        if self.hosts.get(host.stream) is not host or index not in host.loads.get(key, ()):
            return  # gone meanwhile
        sched = model.schedulers.get(version)
        slots = getattr(sched, "slots", None)
        slot = next((s for s in slots or () if s.index == index), None)
        if slots is not None and slot is not None:
            slots.remove(slot)
            self.routes.publish()
        log.info(
            "'%s' version %s: instance %d moves off backend host %s",
            key[0],
            key[1],
            index,
            host.host_id,
        )
        asyncio.get_running_loop().call_later(
            MOVE_GRACE_S, self._unload_moved, model.name, version, key, host, index, slot, 50
        )

    def _unload_moved(
        self,
        name: str,
        version: str,
        key: LoadKey,
        host: Host,
        index: int,
        slot: Slot | None,
        tries: int,
    ) -> None:
        """Unload a moved instance once the scheduler has no batch on it (checked every
        0.1 s, ``tries`` more times at most)."""
        if slot is not None and slot.busy > 0 and tries > 0:
            asyncio.get_running_loop().call_later(
                0.1, self._unload_moved, name, version, key, host, index, slot, tries - 1
            )
            return
        indexes = host.loads.get(key)
        if self.hosts.get(host.stream) is not host or indexes is None or index not in indexes:
            return  # gone, or the load stopped meanwhile
        indexes.remove(index)
        for other in list(self.hosts.values()):  # a Python instance's process: no loss
            if other.instance_of == (name, version, index):
                del self.hosts[other.stream]
        self._send(host.stream, m.UnloadModel(name, version, [index]))
        self.place()  # more to move, maybe

    def _failed_on(self, host: Host, model: Model, mv: ModelVersion, error: str) -> None:
        """``mv`` failed to load on ``host`` while other hosts serve it: it stays READY
        there, and this host is not sent it again (until the model's next load)."""
        key = (mv.name, mv.version, model.generation)
        indexes = host.loads.pop(key, [])
        host.failed.add(key)
        log.error(
            "'%s' version %s failed to load on backend host %s (pid %d), served by the others: %s",
            mv.name,
            mv.version,
            host.host_id,
            host.pid,
            error,
        )
        self._send(host.stream, m.UnloadModel(model.name, mv.version, indexes))
        self._cancel_moves(host)
        self.place()  # spread: its instances go to another host

    def _cancel_moves(self, host: Host) -> None:
        """``host`` will not load the instances moving to it: those stay where they are."""
        for move_key in [k for k, move in self._moves.items() if move[0] is host]:
            del self._moves[move_key]

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
        self._blocks.pop(key, None)
        for move_key in [k for k in self._moves if k[0] == key]:
            del self._moves[move_key]
        for host in list(self.hosts.values()):
            host.failed.discard(key)
            indexes = host.loads.pop(key, None)
            if indexes is not None:
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
        """Send each host of a framework the instances the policy gives it of every
        version that is wanted, neither unloading nor failed (see the module's
        docstring). A version placed afresh turns LOADING; a READY one stays READY."""
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
            count = instance_count(model.config)
            for mv in model.versions.values():
                if mv.state is State.UNLOADING or mv.reason.startswith("load failed"):
                    continue
                key = (mv.name, mv.version, model.generation)
                usable = [h for h in candidates if key not in h.failed]
                plan = (
                    self._per_host(key, count, usable)
                    if self.policy == PER_HOST
                    else self._spread(key, count, usable, mv.state is State.READY)
                )
                for host, positions, replaces in plan:
                    indexes = self._indexes(key, model.generation, count, positions)
                    if indexes is None:
                        break
                    for new, old in zip(indexes, replaces):
                        if old is not None:  # spread: it moves here
                            self._moves[(key, new)] = (host, *old)
                    host.loads.setdefault(key, []).extend(indexes)
                    if mv.state is not State.READY:
                        mv.state = State.LOADING
                    self._send(
                        host.stream,
                        m.LoadModel(
                            model.name,
                            mv.version,
                            str(model.path),
                            model.config.SerializeToString(),
                            indexes,
                        ),
                    )

    @staticmethod
    def _per_host(key: LoadKey, count: int, hosts: list[Host]) -> list[Plan]:
        """``per-host``: every host without the load gets all ``count`` instances."""
        return [(h, list(range(count)), [None] * count) for h in hosts if key not in h.loads]

    def _spread(self, key: LoadKey, count: int, hosts: list[Host], ready: bool) -> list[Plan]:
        """``spread``: the instance positions (``index % count``) no host holds, each to
        the host holding fewest of the load's instances (then fewest instances). With
        none missing and no move under way, instances move from the hosts holding most
        to those holding fewest until they differ by one at most (``ready``: the version
        serves, so every instance placed is loaded)."""
        held = {
            index % m.INSTANCE_STRIDE % count
            for h in self.hosts.values()
            for index in h.loads.get(key, ())
        }
        missing = [j for j in range(count) if j not in held]
        if not hosts:
            return []
        moving = [move for k, move in self._moves.items() if k[0] == key]
        leaving = {(id(h), i) for _, h, i in moving}
        share = {h: sum((id(h), i) not in leaving for i in h.loads.get(key, ())) for h in hosts}
        total = {h: sum(len(i) for i in h.loads.values()) for h in hosts}
        given: dict[Host, tuple[list[int], list[tuple[Host, int] | None]]] = {}

        def give(j: int, replaces: tuple[Host, int] | None) -> Host:
            host = min(hosts, key=lambda h: (share[h], total[h]))
            share[host] += 1
            total[host] += 1
            positions, replaced = given.setdefault(host, ([], []))
            positions.append(j)
            replaced.append(replaces)
            return host

        for j in missing:
            give(j, None)
        while ready and not missing and not moving:
            most = max(hosts, key=lambda h: share[h])
            if share[most] - min(share.values()) < 2:
                break
            index = next(i for i in reversed(most.loads[key]) if (id(most), i) not in leaving)
            leaving.add((id(most), index))
            share[most] -= 1
            give(index % m.INSTANCE_STRIDE % count, (most, index))
        return [(h, positions, replaced) for h, (positions, replaced) in given.items()]

    def _indexes(
        self, key: LoadKey, generation: int, count: int, positions: list[int]
    ) -> list[int] | None:
        """A fresh block's indexes at ``positions``; None past INSTANCE_STRIDE (logged)."""
        block = self._blocks.get(key, 0)
        if (block + 1) * count > m.INSTANCE_STRIDE:
            log.warning(
                "'%s' version %s: load %d has placed %d instances, its indexes are spent; "
                "load the model again to place more",
                key[0],
                key[1],
                generation,
                block * count,
            )
            return None
        self._blocks[key] = block + 1
        base = generation * m.INSTANCE_STRIDE + block * count
        return [base + j for j in positions]

    def host_lost(self, stream: HostStream) -> bool:
        """``stream`` closed; False if it was not a host's (a frontend's stream)."""
        host = self.hosts.get(stream)
        if host is None:
            return False
        self._host_gone(host, "its connection closed")
        return True

    def host_silent(self, host: Host, silent_s: float) -> None:
        """``host`` beat, then said nothing for ``silent_s`` seconds (liveness.py): it is
        gone as if it had exited, and its stream is cut (a frozen host that comes back
        finds it closed and joins again as a new host)."""
        if self.hosts.get(host.stream) is not host:
            return
        cause = f"stopped answering (no heartbeat for {silent_s:.1f} s)"
        self._host_gone(host, f"it {cause}", cause)
        transport = host.stream.transport
        if transport is not None:
            transport.abort()  # not close(): that would wait to flush to a frozen peer

    def _host_gone(self, host: Host, why: str, cause: str = "exited") -> None:
        """Drop the host's instances, send what it was running to another instance of
        the same version once or fail it (dispatch.Dispatcher.fail_host), tell the
        frontends, and re-place its models. ``cause``: what the host did, as requests
        and frontends are told ("exited", "stopped answering (...)")."""
        self.hosts.pop(host.stream, None)
        log.error(
            "backend host %s (%s, pid %d) is gone: %s", host.host_id, host.framework, host.pid, why
        )
        self._cancel_moves(host)  # what was moving to it stays where it was
        for model in [*self.models.values(), *self.staging.values()]:
            for version, sched in model.schedulers.items():
                if sched.remove_slots(host.stream):
                    self._lost_instances(model, version, sched, host)
        named = f"{host.framework}, pid {host.pid}"
        if cause != "exited":
            named = f"{host.host_id}, {named}"
        self.dispatcher.fail_host(
            host.stream,
            unavailable(
                f"the backend host running the model ({named}) {cause} while the request "
                "was in flight"
            ),
            lost=f"({named}) {cause}",
            sequences={
                name
                for name, model in self.models.items()
                if model.config is not None and model.config.HasField("sequence_batching")
            },
        )
        self.dispatcher.announce_gone(host.host_id, cause)
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
