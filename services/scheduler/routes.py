"""Direct routes: which model versions frontends may send straight to a backend host.

A model version that needs no decision in the scheduler beyond "a free instance"
(Triton's default scheduler, or a plain dynamic batcher, which the backend host applies
to its own queue) is published to every frontend (``Routes``), and each backend host is
introduced to each frontend (``Introduce``); frontends then send such requests straight
to an instance's host, and the scheduler is off their path. Sequences, ensembles, the
response cache and priority queues stay in the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from despina.common import messages as m
from despina.common.model_config import ModelConfig
from despina.services.scheduler.default import DefaultScheduler
from despina.services.scheduler.dispatch import FrontendId
from despina.services.scheduler.interface import ModelScheduler
from despina.services.scheduler.placement import Hosts
from despina.services.scheduler.repository import Model, State


class RoutePublisher:
    """Owns the frontends this scheduler knows (reply endpoint -> frontend) and the
    routes they were last told. Reads the models, their schedulers and the hosts; sends
    with ``send`` (to a frontend, now). Runs on the loop's thread only."""

    def __init__(
        self,
        models: dict[str, Model],
        schedulers: dict[tuple[str, str], ModelScheduler],
        hosts: Hosts,
        send: Callable[[FrontendId, msgspec.Struct], None],
        *,
        enabled: bool = True,
    ) -> None:
        self.models = models
        self.schedulers = schedulers
        self.hosts = hosts
        self.enabled = enabled
        self.frontends: dict[str, FrontendId] = {}
        self._send = send
        self._routes = m.Routes([])  # what the frontends were last told
        self._encode = m.encoder().encode

    def frontend_joined(self, identity: FrontendId, reply_endpoint: str) -> None:
        """Remember the frontend, give it the routes, and introduce the hosts to it."""
        self.frontends[reply_endpoint] = identity
        if not self.enabled:
            return
        self._send(identity, self._routes)
        introduce = self._encode(m.Introduce([reply_endpoint]))
        for stream in self.hosts:
            stream.send([introduce])

    def frontend_lost(self, identity: FrontendId) -> None:
        """A frontend's stream closed: forget it."""
        for endpoint, frontend in list(self.frontends.items()):
            if frontend is identity:
                del self.frontends[endpoint]

    def introduction(self) -> m.Introduce | None:
        """What a host that joins is told: the frontends to open links to (None: none)."""
        if self.enabled and self.frontends:
            return m.Introduce(list(self.frontends))
        return None

    def publish(self) -> None:
        """Tell every frontend the direct routes, when they changed."""
        if not self.enabled:
            return
        routes = m.Routes([])
        for model in self.models.values():
            if model.config is None or model.signature is None:
                continue
            if needs_scheduler(model.config):
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
            self._send(frontend, routes)


def needs_scheduler(config: ModelConfig) -> bool:
    """What only the scheduler can do for a model: order sequences, walk an ensemble,
    answer from the response cache, queue by priority or with queue policies. Plain
    dynamic batching is not on the list: a backend host batches its direct requests by
    the same rules (executor.Executor, with common.batching.Batcher)."""
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
