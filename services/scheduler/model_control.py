"""Model control (Triton's ``--model-control-mode``): which models are loaded, and
loading, reloading and unloading them while the server runs.

Modes, as Triton: ``none`` loads every model at start and refuses load/unload;
``explicit`` loads the ``--load-model`` ones (``*``: all) and then what clients ask;
``poll`` loads every model and every ``--repository-poll-secs`` picks up models added,
changed (their folder's ``repository.fingerprint``) or removed.

No request is dropped:
- a (re)load starts the new load's instances beside the serving ones (its generation's
  instance indexes, ``messages.INSTANCE_STRIDE``), and only once every version is
  ready switches the model, its schedulers and its direct routes to it; queued requests
  move to the new schedulers, and the old load retires once its requests are done. A
  reload that fails leaves the serving load as it was (Triton does the same).
- an unload first makes the model's versions UNLOADING (new requests get Triton's
  "not ready" UNAVAILABLE) and withdraws its direct routes, then waits for the requests
  it holds and those in flight, then stops its instances.

Direct requests (a frontend straight to a host) are invisible here: a load retires
``ROUTE_GRACE_S`` after its routes were withdrawn at the earliest, time for frontends
to have their new routes and for what they had sent to finish.

With ``--state-dir`` (explicit mode), the loaded models and their load-time overrides are
kept in a file (model_state.py) that a scheduler started again loads instead of the
``--load-model`` list: a restart (a crash, ``despina serve`` restarting it) serves what
clients had loaded.

Runs on the scheduler's loop; one operation per model at a time (``_lock``), at most
``--model-load-thread-count`` loads at once.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import orjson

from despina.common import messages as m
from despina.common.errors import Code, ServerError, internal, invalid_arg, unavailable
from despina.services.scheduler.dispatch import DROPPED, Dispatcher, FrontendId
from despina.services.scheduler.interface import ModelScheduler
from despina.services.scheduler.model_state import ModelState
from despina.services.scheduler.placement import Placement
from despina.services.scheduler.repository import (
    Model,
    State,
    fingerprint,
    list_models,
    read_model,
    scan,
    write_override_files,
)
from despina.services.scheduler.routes import RoutePublisher

log = logging.getLogger("despina.scheduler")

MODES = ("none", "explicit", "poll")
# Frontends have the new routes, and direct requests sent before them have finished.
ROUTE_GRACE_S = 1.0
# How long an unload or a retiring load waits for the requests it holds.
DRAIN_TIMEOUT_S = 60.0
# How long a load waits for its instances before it is answered as failed.
LOAD_TIMEOUT_S = 300.0
_TICK_S = 0.02
# How long a load waits for a backend host of its framework to join.
NO_HOST_S = 10.0
# The scheduler's exit status under --exit-on-error: a setting (a model) to fix, so
# ``despina serve`` stops instead of restarting it (services/supervisor.py).
EXIT_CONFIG = 78

# Triton's words for load/unload when the mode does not allow them (its qa tests match
# the start).
NOT_ALLOWED = "explicit model load / unload is not allowed if polling is enabled"
NOT_ALLOWED_IN_NONE = (
    NOT_ALLOWED + " (Despina runs in model control mode 'none': every model in the "
    "repository is loaded at start; start it with --model-control-mode=explicit)"
)


@dataclass
class ControlSettings:
    """The model-control flags (services/flags.py declares them as tritonserver does)."""

    mode: str = "none"
    load_models: list[str] = field(default_factory=list)  # explicit: loaded at start
    poll_secs: float = 15.0
    strict_readiness: bool = True
    exit_on_error: bool = False
    load_threads: int = 4
    # explicit: the folder of the loaded models' state file (model_state.py); '' none
    state_dir: str = ""


class ModelControl:
    """Owns which load of each model serves (``models``, the scheduler's table, and
    ``schedulers`` for the serving loads), the loads on their way in (placement's
    ``staging``) and the folders written for file overrides (under ``override_root``).
    Loop's thread only."""

    def __init__(
        self,
        roots: list[Path],
        settings: ControlSettings,
        models: dict[str, Model],
        schedulers: dict[tuple[str, str], ModelScheduler],
        make_scheduler: Callable[[Model, str], ModelScheduler],
    ) -> None:
        """Reads the repositories: every model, or in explicit mode the ``--load-model``
        ones, into ``models`` (a model named there and absent is UNAVAILABLE, its reason
        says so). Raises INVALID_ARG for an unknown mode or a repository that is missing.
        ``attach`` must be called before ``start``."""
        if settings.mode not in MODES:
            raise invalid_arg(
                f"--model-control-mode must be one of {', '.join(MODES)}, not '{settings.mode}'"
            )
        self.roots = roots
        self.settings = settings
        self.override_root = Path(tempfile.mkdtemp(prefix="despina-overrides-"))
        self.models = models
        self.schedulers = schedulers
        self.make_scheduler = make_scheduler
        self.exit_code = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._loads: asyncio.Semaphore | None = None
        self._generations: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        # explicit with --state-dir: what the last scheduler had loaded (model_state.py)
        self.state: ModelState | None = None
        saved = None
        if settings.mode == "explicit" and settings.state_dir:
            self.state = ModelState(Path(settings.state_dir))
            saved = self.state.read()
        if saved is not None:
            log.info("loading the models the last scheduler had loaded: %s", sorted(saved))
            found = self._read_saved(saved)
        elif settings.mode == "explicit" and "*" not in settings.load_models:
            wanted = set(settings.load_models)
            found = scan(roots, wanted)
            for name in sorted(wanted - set(found)):
                missing = Model(name=name, path=Path(name))
                missing.error = f"failed to load '{name}': no model folder of that name"
                log.error("%s in %s", missing.error, ", ".join(map(str, roots)))
                found[name] = missing
        else:
            found = scan(roots)
        for model in found.values():
            self._register(model)
        if self.state is not None and saved is None:
            self.state.models = {n: {} for n, model in found.items() if model.config is not None}

    def _read_saved(self, saved: dict[str, dict]) -> dict[str, Model]:
        """The models of a state file, read as their loads did (with their overrides); one
        whose folder is gone or whose overrides no longer read is UNAVAILABLE, saying why."""
        found = scan(self.roots, {n for n, args in saved.items() if not args})
        for name, args in saved.items():
            if name in found:
                continue
            try:
                if not args:
                    raise invalid_arg("no model folder of that name")
                files = {k[len("file:") :]: v for k, v in args.items() if k.startswith("file:")}
                config = args.get("config")
                if files:
                    path = write_override_files(name, files, self.override_root)
                    found[name] = read_model(path, config, name)
                    found[name].owned_dir = path.parent
                else:
                    found[name] = read_model(self._folder(name), config, name)
            except ServerError as exc:
                missing = Model(name=name, path=Path(name))
                missing.error = f"failed to load '{name}' again: {exc.message}"
                log.error("%s", missing.error)
                found[name] = missing
        return found

    def attach(
        self,
        placement: Placement,
        routes: RoutePublisher,
        dispatcher: Dispatcher,
        stop: Callable[[], None],
    ) -> None:
        """The parts model control drives; ``stop`` stops the scheduler (exit on error)."""
        self.placement = placement
        self.routes = routes
        self.dispatcher = dispatcher
        self._stop = stop

    def start(self) -> None:
        """On the loop: the poll task (poll mode) and the start-up check (exit on error)."""
        self._loads = asyncio.Semaphore(max(1, self.settings.load_threads))
        if self.settings.mode == "poll":
            self._spawn(self._poll())
        if self.settings.exit_on_error:
            self._spawn(self._exit_if_start_failed())

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        shutil.rmtree(self.override_root, ignore_errors=True)

    # --- the repository index ---------------------------------------------------------------

    def unloaded_names(self) -> list[str]:
        """Models in the repositories that no load has read (listed in the index with
        no state, as Triton lists them)."""
        try:
            names = list_models(self.roots)
        except ServerError:
            return []
        return [name for name in names if name not in self.models]

    # --- requests ---------------------------------------------------------------------------

    def request(self, send: Callable[[FrontendId, msgspec.Struct], None], frontend, q) -> None:
        """A ``repository_load`` / ``repository_unload`` query: answered with ``send``
        once done (a ``QueryReply`` with Triton's error, or none)."""
        self._spawn(self._answer(send, frontend, q))

    async def _answer(self, send, frontend: FrontendId, q: m.Query) -> None:
        try:
            if self.settings.mode != "explicit":
                raise ServerError(
                    Code.UNSUPPORTED,
                    NOT_ALLOWED_IN_NONE if self.settings.mode == "none" else NOT_ALLOWED,
                )
            args = _parameters(q.body)
            if q.kind == "repository_load":
                await self.load(q.model, args)
                if self.state is not None:
                    self.state.loaded(
                        q.model,
                        {k: v for k, v in args.items() if k == "config" or k[:5] == "file:"},
                    )
            else:
                await self.unload(q.model, bool(args.get("unload_dependents", False)))
            reply = m.QueryReply(q.qid)
        except ServerError as exc:
            reply = m.QueryReply(q.qid, b"", m.Error(exc.code.value, exc.message))
        except Exception as exc:  # a bug: answer it, keep serving
            log.exception("model control of '%s' failed", q.model)
            error = internal(f"{type(exc).__name__}: {exc}")
            reply = m.QueryReply(q.qid, b"", m.Error(error.code.value, error.message))
        send(frontend, reply)

    # --- load -------------------------------------------------------------------------------

    async def load(self, name: str, args: dict) -> None:
        """Load ``name`` (again if it serves and changed, or with overrides): from its
        folder, with ``args["config"]`` (JSON) replacing its config.pbtxt, or from the
        ``file:<version>/<name>`` files alone (then ``config`` is required). Returns once
        every version is ready. Raises INVALID_ARG with Triton's words when it is not:
        a model that served before goes on serving as it was."""
        config = args.get("config")
        if config is not None and not isinstance(config, str):
            raise invalid_arg(f"failed to load '{name}': the 'config' parameter must be a string")
        files = {k[len("file:") :]: v for k, v in args.items() if k.startswith("file:")}
        if files and config is None:
            raise invalid_arg(
                f"failed to load '{name}': a load with file overrides must also give the "
                "model's 'config'"
            )
        if any(not isinstance(v, str) for v in files.values()):
            raise invalid_arg(f"failed to load '{name}': file override content must be base64")
        assert self._loads is not None
        async with self._lock(name), self._loads:
            owned: Path | None = None
            if files:
                path = write_override_files(name, files, self.override_root)
                owned = path.parent
            else:
                path = self._folder(name)
            new = read_model(path, config, name)
            new.owned_dir = owned
            current = self.models.get(name)
            if (
                config is None
                and current is not None
                and current.wanted
                and current.owned_dir is None
                and current.config is not None
                and current.fingerprint == new.fingerprint
                and all(mv.state is State.READY for mv in current.versions.values())
            ):
                return  # loaded and unchanged: nothing to do, as Triton
            await self._switch_to(new)

    def _folder(self, name: str) -> Path:
        path = list_models(self.roots).get(name)
        if path is None:
            raise invalid_arg(f"failed to load '{name}', failed to poll from model repository")
        return path

    async def _switch_to(self, new: Model) -> None:
        """Load ``new``'s instances, then make it the model's serving load (see the
        module's docstring). Raises INVALID_ARG naming what failed."""
        name = new.name
        current = self.models.get(name)
        if new.config is None:
            _remove(new.owned_dir)
            if current is None or not current.wanted or current.config is None:
                self._register(new)  # the index shows why
            raise invalid_arg(f"failed to load '{name}': {new.error}")
        new.generation = self._next_generation(name)
        new.schedulers = {v: self.make_scheduler(new, v) for v in new.versions}
        self.placement.staging[name] = new
        try:
            self.placement.place()
            await self._settled(new)
        finally:
            self.placement.staging.pop(name, None)
        failed = [mv for mv in new.versions.values() if mv.state is not State.READY]
        why = "; ".join(
            f"version {mv.version}: {mv.reason or 'not loaded in time'}" for mv in failed
        )
        serving = current is not None and current.wanted and current.ready_versions()
        if failed and serving:
            for version in new.versions:
                self.placement.stop_instances(new, version)
            _remove(new.owned_dir)
            raise invalid_arg(f"failed to load '{name}': {why} (the loaded model serves on)")
        touched = []
        for version, sched in new.schedulers.items():
            old = self.schedulers.get((name, version))
            self.schedulers[(name, version)] = sched
            if old is not None:
                for pending in old.drain_queue():
                    sched.enqueue(pending)
            touched.append((name, version))
        self.models[name] = new
        self.routes.publish()
        for key in touched:
            self.dispatcher.dispatch(key)
        log.info("model '%s' (load %d) serves versions %s", name, new.generation, new.versions)
        if current is not None and current.config is not None:
            self._spawn(
                self._retire(current, drop_versions=set(current.versions) - set(new.versions))
            )
        if failed:
            raise invalid_arg(f"failed to load '{name}': {why}")

    async def _settled(self, model: Model) -> None:
        """Until every version of ``model`` is READY or failed (or LOAD_TIMEOUT_S). With
        no backend host of its framework for NO_HOST_S, its versions fail saying so."""
        start = time.monotonic()
        while time.monotonic() < start + LOAD_TIMEOUT_S:
            if all(
                mv.state is State.READY or mv.reason.startswith("load failed")
                for mv in model.versions.values()
            ):
                return
            if time.monotonic() > start + NO_HOST_S and not any(
                h.framework == model.framework and h.instance_of is None
                for h in self.placement.hosts.values()
            ):
                for mv in model.versions.values():
                    mv.state = State.UNAVAILABLE
                    mv.reason = (
                        f"load failed: no backend host of framework '{model.framework}' runs "
                        "(despina serve starts one for each framework in the repository at "
                        "start; start one with despina backend-host)"
                    )
                return
            await asyncio.sleep(_TICK_S)

    async def _retire(self, old: Model, drop_versions: set[str]) -> None:
        """Stop ``old``'s instances once no request needs them; forget the versions the
        new load does not have (``drop_versions``)."""
        await self._drained(old, time.monotonic() + ROUTE_GRACE_S)
        for version in old.versions:
            self._fail_queued(old, version)
            self.placement.stop_instances(old, version)
            if version in drop_versions and self.schedulers.get((old.name, version)) is (
                old.schedulers.get(version)
            ):
                del self.schedulers[(old.name, version)]
        _remove(old.owned_dir)
        log.info("model '%s' load %d retired", old.name, old.generation)

    async def _drained(self, model: Model, not_before: float) -> None:
        """Until ``model``'s load holds no request (queued in its own schedulers, or in
        flight on its instances) and ``not_before`` has passed; DRAIN_TIMEOUT_S at most."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            if time.monotonic() >= not_before and not self._holds_requests(model):
                return
            await asyncio.sleep(_TICK_S)
        log.warning(
            "model '%s': requests still in flight after %.0fs; stopping its instances",
            model.name,
            DRAIN_TIMEOUT_S,
        )

    def _fail_queued(self, model: Model, version: str) -> None:
        """Answer UNAVAILABLE what is still queued for ``model``'s ``version`` when its
        instances stop (after the drain timed out, or its instances went away)."""
        live = self.schedulers.get((model.name, version))
        if live is None or live is not model.schedulers.get(version):
            return  # not serving: its queue moved to the load that replaced it
        for pending in live.drain_queue():
            if pending.buffers is DROPPED:
                continue  # answered CANCELLED already
            self.dispatcher.reply_error(
                pending.frontend,
                pending.request,
                unavailable(f"model '{model.name}' version {version} was unloaded"),
            )

    def _holds_requests(self, model: Model) -> bool:
        for version, sched in model.schedulers.items():
            if self.schedulers.get((model.name, version)) is sched and _queued(sched):
                return True
        generation = model.generation
        for entry in self.dispatcher.inflight.values():
            slot = entry.slot
            if slot.model == model.name and slot.index // m.INSTANCE_STRIDE == generation:
                return True
        return False

    # --- unload -----------------------------------------------------------------------------

    async def unload(self, name: str, dependents: bool = False) -> None:
        """Unload ``name``: its versions turn UNLOADING (new requests are refused as not
        ready), its routes go, the requests it holds finish, its instances stop; then it
        is UNAVAILABLE "unloaded" in the index. ``dependents``: the models its ensemble
        steps use go too. Unloading a model that is not loaded succeeds (nothing to do)."""
        async with self._lock(name):
            model = self.models.get(name)
            if model is None or not model.wanted:
                return
            model.wanted = False
            for mv in model.versions.values():
                mv.state, mv.reason = State.UNLOADING, ""
            self.routes.publish()
            await self._drained(model, time.monotonic() + ROUTE_GRACE_S)
            for mv in model.versions.values():
                self._fail_queued(model, mv.version)
                self.placement.stop_instances(model, mv.version)
                mv.state, mv.reason = State.UNAVAILABLE, "unloaded"
            self.routes.publish()
            _remove(model.owned_dir)
            model.owned_dir = None
            if self.state is not None:
                self.state.unloaded(name)
            log.info("successfully unloaded '%s'", name)
        if dependents and model.config is not None:
            for step in model.config.ensemble_scheduling.step:
                if step.model_name != name:
                    await self.unload(step.model_name, True)

    def forget(self, name: str) -> None:
        """A model whose folder is gone (poll mode), once unloaded: out of the index."""
        model = self.models.pop(name, None)
        if model is None:
            return
        for version in model.versions:
            if self.schedulers.get((name, version)) is model.schedulers.get(version):
                self.schedulers.pop((name, version), None)

    # --- poll mode --------------------------------------------------------------------------

    async def _poll(self) -> None:
        """Every ``poll_secs``: load models added, reload models changed, unload and
        forget models removed. A failure is logged; the next poll tries again."""
        while True:
            await asyncio.sleep(self.settings.poll_secs)
            try:
                await self.poll_once()
            except Exception:
                log.exception("polling the model repository failed")

    async def poll_once(self) -> None:
        try:
            found = list_models(self.roots)
        except ServerError as exc:
            log.error("polling the model repository: %s", exc.message)
            return
        for name, path in found.items():
            current = self.models.get(name)
            if current is not None and current.fingerprint == fingerprint(path):
                continue
            log.info("model '%s' %s", name, "added" if current is None else "changed")
            try:
                await self.load(name, {})
            except ServerError as exc:
                log.error("%s", exc.message)
        for name in [n for n in self.models if n not in found]:
            log.info("model '%s' removed from the repository", name)
            await self.unload(name)
            self.forget(name)

    # --- start-up ---------------------------------------------------------------------------

    async def _exit_if_start_failed(self) -> None:
        """--exit-on-error: stop the scheduler (``EXIT_CONFIG``) when a model read at start
        fails to load."""
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        start = list(self.models.values())
        while time.monotonic() < deadline:
            failed = [f"{model.name}: {model.error}" for model in start if model.config is None] + [
                f"{mv.name} version {mv.version}: {mv.reason}"
                for model in start
                for mv in model.versions.values()
                if mv.reason.startswith("load failed")
            ]
            if failed:
                log.error(
                    "--exit-on-error: a model failed to load at start (%s); stopping",
                    "; ".join(failed),
                )
                self.exit_code = EXIT_CONFIG
                self._stop()
                return
            if all(mv.state is State.READY for mo in start for mv in mo.versions.values()):
                return
            await asyncio.sleep(_TICK_S * 5)

    # --- helpers ----------------------------------------------------------------------------

    def _register(self, model: Model) -> None:
        """``model`` as the serving load of its name, at start or when its config failed."""
        model.generation = self._next_generation(model.name)
        model.schedulers = {v: self.make_scheduler(model, v) for v in model.versions}
        self.models[model.name] = model
        for version, sched in model.schedulers.items():
            self.schedulers[(model.name, version)] = sched

    def _next_generation(self, name: str) -> int:
        generation = self._generations.get(name, -1) + 1
        self._generations[name] = generation
        return generation

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _parameters(body: bytes) -> dict:
    """A load's or unload's parameters (JSON object). Raises INVALID_ARG."""
    if not body:
        return {}
    try:
        args = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid_arg(f"failed to parse the request parameters: {exc}") from None
    if not isinstance(args, dict):
        raise invalid_arg("the request parameters must be a JSON object")
    return args


def _queued(sched: ModelScheduler) -> bool:
    return bool(getattr(sched, "queue", None))


def _remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
