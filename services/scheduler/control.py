"""Answers to the control plane's queries (readiness, metadata, config, repository index,
client shared-memory regions) as typed records (common/control.py) in a ``QueryReply``;
each frontend encodes them for its protocol. Off the request path."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable

import orjson

from despina.common import control as c
from despina.common import messages as m
from despina.common.errors import Code, ServerError, invalid_arg, not_found, unavailable
from despina.common.shm.regions import RegionRegistry
from despina.services.scheduler import validate
from despina.services.scheduler.repository import Model, State

log = logging.getLogger("despina.scheduler")


class ControlAnswers:
    """Reads the models; owns the client shared-memory registry (``regions``), which the
    scheduler also reads to resolve the regions requests name. Loop's thread only."""

    def __init__(
        self,
        models: dict[str, Model],
        regions: RegionRegistry,
        *,
        allow_client_shm: bool,
        strict_readiness: bool = True,
        unloaded: Callable[[], list[str]] | None = None,
    ) -> None:
        """``strict_readiness`` (Triton's --strict-readiness): the server is ready only
        once every model it loads is; false: once it answers. ``unloaded``: the
        repository's models no load has read (model_control.py), for the index."""
        self.models = models
        self.regions = regions
        self.allow_client_shm = allow_client_shm
        self.strict_readiness = strict_readiness
        self.unloaded = unloaded

    def answer(self, q: m.Query) -> m.QueryReply:
        """The reply to ``q``: its record, none, or the error (never raises)."""
        try:
            record = self._record(q)
        except ServerError as exc:
            return m.QueryReply(q.qid, b"", m.Error(exc.code.value, exc.message))
        return m.QueryReply(q.qid, record=record)

    def _record(self, q: m.Query) -> c.Record | None:
        if q.kind == "server_ready":
            if not self.strict_readiness:
                return None
            waiting = [
                f"{mv.name}:{mv.version}"
                for model in self.models.values()
                if model.wanted
                for mv in model.versions.values()
                if mv.state is State.LOADING
                or (mv.state is State.UNAVAILABLE and not mv.reason.startswith("load failed"))
            ]
            if waiting:
                raise unavailable(f"models not ready yet: {', '.join(waiting)}")
            return None
        if q.kind == "repository_index":
            return self._index()
        if q.kind.startswith(("shm_", "cuda_shm_")):
            return self._shm(q)
        model = self.models.get(q.model)
        if model is None:
            raise not_found(f"Request for unknown model: '{q.model}' is not found")
        validate.resolve_version(model, q.version)
        if q.kind == "model_ready":
            return None
        if q.kind == "model_metadata":
            return model.metadata()
        if q.kind == "model_config":
            return model.config_record
        raise ServerError(Code.UNSUPPORTED, f"unknown query '{q.kind}'")

    def _shm(self, q: m.Query) -> c.ShmStatus | c.CudaShmStatus | None:
        cuda = q.kind.startswith("cuda_")
        kind = q.kind.removeprefix("cuda_")
        if kind == "shm_status":
            if cuda:
                return c.CudaShmStatus(
                    [
                        c.CudaShmRegionStatus(r["name"], r["device_id"], r["byte_size"])
                        for r in self.regions.cuda_status(q.model)
                    ]
                )
            return c.ShmStatus(
                [
                    c.ShmRegionStatus(r["name"], r["key"], r["offset"], r["byte_size"])
                    for r in self.regions.status(q.model)
                ]
            )
        if kind == "shm_unregister":
            if cuda:
                self.regions.unregister_cuda(q.model)
            else:
                self.regions.unregister(q.model)
            return None
        if not self.allow_client_shm:
            raise ServerError(
                Code.UNAVAILABLE,
                "client shared memory is disabled on this server: start it with "
                "--allow-client-shm=true to let clients register regions",
            )
        self._register(q.body, cuda)
        return None

    def _register(self, body: bytes, cuda: bool) -> None:
        """``body``: the registration's JSON as the HTTP extension spells it."""
        try:
            args = orjson.loads(body)
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

    def _index(self) -> c.RepositoryIndex:
        entries: list[c.IndexEntry] = []
        for model in self.models.values():
            if not model.versions:
                entries.append(c.IndexEntry(model.name, None, State.UNAVAILABLE.value, model.error))
            for mv in model.versions.values():
                entries.append(c.IndexEntry(model.name, mv.version, mv.state.value, mv.reason))
        for name in self.unloaded() if self.unloaded is not None else []:
            entries.append(c.IndexEntry(name, None, "", ""))
        entries.sort(key=lambda e: (e.name, int(e.version) if e.version else -1))
        return c.RepositoryIndex(entries)
