"""The backend host: one process that runs model instances for one framework.

``BackendHost`` wires the parts and holds the links. It opens a stream to the scheduler
(common/streams.py), says hello, loads and unloads instances on its orders, and passes
``ExecuteBatch`` and ``Cancel`` to its ``Executor``, whose results ``Replies`` sends
straight to the frontends that asked, reporting completions to the scheduler in one
message per wake. The stream is the host's identity: if it closes, the scheduler fails
what was in flight here, and this host joins again with a clean slate.

The host also opens a link to each frontend the scheduler introduces, and says whose it
is (``HostLink``): frontends send requests for direct routes over it (an ``Execution``
marked ``direct``: no scheduler between), the replies to everything that frontend asked
come back on it, and the frontend's ``Release`` of output blocks arrives on it. A direct
request is the frontend's to track: no completion for it goes to the scheduler, and if
this host dies, the frontend sees its link close and fails what it had sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec

from despina.common import logs, streams, trace_stamps
from despina.common import messages as m
from despina.common.cuda import CudaMapper
from despina.common.errors import ServerError, invalid_arg
from despina.common.settings import SpeedPaths
from despina.common.shm.arena import ShmArena, ShmMapper, arena_prefix
from despina.common.stats import Recorder
from despina.services.backend_host import warmup
from despina.services.backend_host.backend import Backend, InstanceSpec, ModelInstance
from despina.services.backend_host.executor import Executor, instance_specs
from despina.services.backend_host.heartbeat import Heartbeat
from despina.services.backend_host.replies import Replies

log = logging.getLogger("despina.backend_host")
# After losing the scheduler: how long the executions in progress may take to finish
# before the instances are dropped and the host joins again.
REJOIN_DRAIN_S = 2.0


class BackendHost:
    """Runs model instances for one framework: the links (scheduler, frontends), the
    lifecycle and the control messages; executions are the ``executor``'s, replies the
    ``replies``'. All methods run on the loop's thread."""

    def __init__(
        self,
        scheduler_endpoint: str,
        framework: str,
        backend: Backend | None,
        *,
        host_id: str | None = None,
        instance_of: tuple[str, str, int] | None = None,
        arena_threshold: int,
        speed: SpeedPaths | None = None,
        statistics: bool = True,
        heartbeat_interval_s: float = 0.0,
    ) -> None:
        """``arena_threshold``: outputs of at least this many bytes go back through this
        host's arena when the frontend shares /dev/shm (--inline-threshold). ``speed``:
        the speed paths (busy polling, burst sends, loop execution); default all on.
        ``heartbeat_interval_s``: how often a thread of its own tells the scheduler this
        process runs (heartbeat.py); 0: never."""
        self.speed = speed = speed or SpeedPaths()
        self.scheduler_endpoint = scheduler_endpoint
        self.framework = framework
        self.backend = backend
        self.host_id = host_id or f"{framework}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.instance_of = instance_of
        # Read-only for inputs, so no backend can write into a client's input region;
        # read-write only for the client output regions encode_response fills.
        self.mapper = ShmMapper(capacity=16)
        self.cuda = CudaMapper()  # opens clients' CUDA IPC handles, only when one is used
        # Outputs this large go into this host's arena when the frontend shares /dev/shm
        # (a unix-socket reply endpoint); the frontend releases them after sending.
        self.arena = ShmArena(arena_prefix("bh"))
        instances: dict = {}
        self.replies = Replies(
            self.host_id,
            self.mapper,
            self.cuda,
            self.arena,
            instances,
            self._send,
            self._on_frontend_burst,
            self._idle,
            arena_threshold,
        )
        self.executor = Executor(self.mapper, self.cuda, self.replies, speed.loop_execution)
        self.executor.instances = instances
        if statistics:  # what this host executes, counted (common/stats.py)
            self.executor.stats = Recorder(
                self._send, collect=self.executor.count_queued, gauges=self.executor.pending
            )
        self._start = self.executor.start
        self._encode = m.encoder().encode
        self._decode = m.decoder(m.HostInbound).decode
        self._decode_frontend = m.decoder(m.HostFromFrontend).decode
        self._stopping = asyncio.Event()
        self._link: streams.FramedProtocol | None = None
        self._load_error = ""
        # Extra control handlers (the Python launcher overrides loading).
        self.on_load: Callable[[m.LoadModel], None] | None = None
        self.on_unload: Callable[[m.UnloadModel], None] | None = None
        self.on_rejoin: Callable[[], None] | None = None
        self.heartbeat = Heartbeat(scheduler_endpoint, self.host_id, heartbeat_interval_s)

    def _idle(self) -> bool:
        """Nothing executing and nothing waiting in a batcher."""
        return not self.executor.inflight and not self.executor.queued()

    @property
    def instances(self) -> dict:
        return self.executor.instances

    # --- lifecycle ---------------------------------------------------------------------

    async def run(self, load_error: str = "") -> None:
        """Serve until stopped. Connects to the scheduler (retrying until it listens),
        and after losing it drops every instance and joins again; a Python instance
        process returns instead, and its launcher decides."""
        executor = self.executor
        # Idle after answering a few: poll for the next request instead of sleeping. Not
        # while an execution runs on a thread: polling would hold the GIL it needs.
        self.replies.start(
            self.speed.busy_poll_s, lambda: not executor.inflight, burst=self.speed.burst
        )
        self._load_error = load_error
        backoff = 0.02
        while not self._stopping.is_set():
            lost = asyncio.get_running_loop().create_future()
            try:
                self._link = await streams.connect(
                    self.scheduler_endpoint,
                    lambda _link, burst: self._on_burst(burst),
                    lambda _link, lost=lost: lost.done() or lost.set_result(None),
                )
            except OSError as exc:
                log.debug("scheduler not reachable at %s yet: %s", self.scheduler_endpoint, exc)
                await asyncio.sleep(backoff)
                backoff = min(0.25, backoff * 2)  # small: a restarted scheduler is found soon
                continue
            backoff = 0.02
            self._hello()
            self.heartbeat.start()  # once: it reconnects by itself
            if self._load_error:
                break  # the hello told the scheduler why this instance cannot serve
            log.info(
                "backend host %s (%s) connected to %s",
                self.host_id,
                self.framework,
                self.scheduler_endpoint,
            )
            stop = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait([lost, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if self._stopping.is_set():
                break
            log.warning("lost the scheduler at %s", self.scheduler_endpoint)
            if self.instance_of is not None:
                break
            # What runs and waits finishes first (its replies go straight to the
            # frontends, which stop sending here as they lose the scheduler too).
            await self._drain(REJOIN_DRAIN_S)
            executor.unload_all()
            if self.on_rejoin is not None:
                self.on_rejoin()
        self.heartbeat.stop()
        await self._drain()
        executor.unload_all()
        self.replies.close()
        log.info("output arena: %d block(s) in use at exit", self.arena.blocks_in_use)
        self.arena.close()
        self.cuda.close()
        if self._link is not None:
            self._link.close()
        # Let the last messages (a load error, final completions) leave.
        await asyncio.sleep(0.05)

    def stop(self) -> None:
        self._stopping.set()

    def _send(self, msg: msgspec.Struct) -> None:
        if self._link is None or not self._link.send([self._encode(msg)]):
            log.warning("could not send %s to the scheduler", type(msg).__name__)

    def _hello(self) -> None:
        self._send(
            m.HostHello(
                m.PROTOCOL_VERSION,
                self.host_id,
                self.framework,
                os.getpid(),
                self.instance_of,
                self._load_error,
            )
        )

    async def _drain(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        executor = self.executor
        while (executor.inflight or executor.queued()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # --- inbound ------------------------------------------------------------------------

    def _on_burst(self, burst: list[list]) -> None:
        outbox = self.replies.outbox
        assert outbox is not None
        with outbox.gathering:  # the burst's replies leave when it is handled
            self._on_scheduler_messages(burst)

    def _on_scheduler_messages(self, burst: list[list]) -> None:
        for frames in burst:
            try:
                msg = self._decode(frames[0])
            except (msgspec.DecodeError, IndexError) as exc:
                log.warning("dropping an undecodable message: %s", exc)
                continue
            if isinstance(msg, m.ExecuteBatch):
                for execution in msg.executions:
                    self._start(execution, frames)
            elif isinstance(msg, m.Cancel):
                self.executor.cancel(msg)
            elif isinstance(msg, m.LoadModel):
                if self.on_load is not None:
                    self.on_load(msg)
                else:
                    asyncio.get_running_loop().create_task(self._load(msg))
            elif isinstance(msg, m.UnloadModel):
                if self.on_unload is not None:
                    self.on_unload(msg)
                for key in [
                    k
                    for k in self.instances
                    if k[:2] == (msg.model, msg.version)
                    and (msg.instances is None or k[2] in msg.instances)
                ]:
                    self.executor.unload(key)
            elif isinstance(msg, m.Settings):  # the logging extension's, from the scheduler
                logs.apply(msg.log)
                self.executor.tracing = trace_stamps.tracing(msg.trace)
                # Verbose: every execution logged; otherwise no cost on the path.
                self._start = self._start_logged if logs.verbose() else self.executor.start
            elif isinstance(msg, m.StatsFlush):  # a statistics query: what is counted, now
                if self.executor.stats is not None:
                    self.executor.stats.flush(msg.token)
                else:
                    self._send(m.StatsReport([], msg.token))
            elif isinstance(msg, m.Introduce):
                hello = self._encode(m.HostLink(self.host_id))
                for endpoint in msg.endpoints:
                    self.replies.stream(endpoint).send([hello])

    def _start_logged(self, execution: m.Execution, frames: list) -> None:
        """``executor.start`` after a verbose line naming the requests (in place of it
        while the log verbose level is above 0)."""
        log.debug(
            "execute %s:%s on instance %d (%s): %s",
            execution.model,
            execution.version,
            execution.instance,
            "direct" if execution.direct else "scheduled",
            ", ".join(f"id '{r.request_id}'" for r in execution.requests),
        )
        self.executor.start(execution, frames)

    def _on_frontend_burst(self, link: streams.FramedProtocol, burst: list[list]) -> None:
        """Direct requests, cancels, and releases of output blocks the frontend has sent
        on. The burst's replies leave when it is handled (docs/architecture.md#bursts)."""
        outbox = self.replies.outbox
        assert outbox is not None
        with outbox.gathering:
            try:
                self._on_frontend_messages(link, burst)
            finally:
                self.executor.pump_added()

    def _on_frontend_messages(self, link: streams.FramedProtocol, burst: list[list]) -> None:
        for frames in burst:
            try:
                msg = self._decode_frontend(frames[0])
            except (msgspec.DecodeError, IndexError) as exc:
                log.warning("dropping an undecodable message from a frontend: %s", exc)
                continue
            if isinstance(msg, m.ExecuteBatch):
                for execution in msg.executions:
                    self._start(execution, frames)
                continue
            if isinstance(msg, m.Cancel):
                self.executor.cancel(msg)
                continue
            endpoint = self.replies.endpoint_of(link)
            if endpoint is not None:
                self.replies.release(endpoint, msg.blocks)

    # --- loading ----------------------------------------------------------------------------

    async def _load(self, msg: m.LoadModel) -> None:
        assert self.backend is not None
        loop = asyncio.get_running_loop()
        loaded: list[int] = []
        error = ""
        completed = b""
        try:
            completed = await loop.run_in_executor(None, self._complete_config, msg)
            if completed:
                msg = m.LoadModel(msg.model, msg.version, msg.model_dir, completed, msg.instances)
            for spec in instance_specs(msg):
                instance = await loop.run_in_executor(None, self._load_instance, spec)
                self.executor.add(spec, instance)
                loaded.append(spec.instance_index)
        except ServerError as exc:
            error = exc.message
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("loading '%s' failed:\n%s", msg.model, traceback.format_exc())
        if error:
            for index in loaded:
                self.executor.unload((msg.model, msg.version, index))
            loaded = []
            self.executor.rebalance_threads()
        self._send(m.LoadResult(msg.model, msg.version, loaded, error, completed))
        if not error:
            log.info("loaded '%s' version %s: %d instance(s)", msg.model, msg.version, len(loaded))

    def _complete_config(self, msg: m.LoadModel) -> bytes:
        """Triton's auto-complete, done where the model file can be read: the config with
        the inputs, outputs and max_batch_size it left out filled by the backend from the
        model file, serialized; empty when it needed nothing (or the backend completes
        nothing). Raises ServerError saying why the file could not complete it. Runs on
        a thread: it may read the model."""
        from despina.common import model_config
        from despina.common.protos import model_config_pb2 as mc

        config = mc.ModelConfig()
        config.ParseFromString(msg.config)
        if not model_config.needs_completion(config):
            return b""
        complete = getattr(self.backend, "complete_config", None)
        if complete is None:  # TorchScript, TensorRT: as Triton's backends, no file says
            raise invalid_arg(
                f"model '{msg.model}': the {self.framework} backend cannot complete the "
                "inputs and outputs of a config from the model file: declare them in "
                "config.pbtxt"
            )
        complete(config, Path(msg.model_dir) / msg.version)
        model_config.validate(config)
        return config.SerializeToString()

    def _load_instance(self, spec: InstanceSpec) -> ModelInstance:
        """Load one instance and run its warmup (``model_warmup``) before it is reported
        loaded; a failed warmup unloads it and raises, naming the sample. Runs on a
        thread."""
        assert self.backend is not None
        instance = self.backend.load(spec)
        try:
            warmup.run(instance, spec)
        except BaseException:
            instance.unload()
            raise
        return instance

    def add_instance(self, spec: InstanceSpec, instance: ModelInstance) -> None:
        """An instance loaded by the caller (a Python instance process)."""
        self.executor.add(spec, instance)
