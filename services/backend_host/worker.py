"""The backend host's loop: batches in -> numpy views -> instance.execute -> outputs out.

A backend host opens a stream to the scheduler (common/streams.py), receives
``ExecuteBatch`` messages, runs each execution on its model instance and sends the
replies straight to the frontends that asked (one message per frontend per wake), then
reports completions to the scheduler in one message. The stream is the host's identity:
if it closes, the scheduler fails what was in flight here, and this host reconnects
with a clean slate.

The host also opens a link to each frontend the scheduler introduces, and says whose it
is (``HostLink``): frontends send requests for direct routes over it (no scheduler
between), and the replies to everything that frontend asked come back on it. A direct
request is the frontend's to track: no completion for it goes to the scheduler, and if
this host dies, the frontend sees its link close and fails what it had sent. Direct
requests for a model with dynamic batching wait in their instance's ``LocalBatcher`` and
run in batches by Triton's rules, as the scheduler's batcher would run them.

Instances run on the loop's thread when the host has a single instance (no thread hop),
otherwise each instance has a thread of its own so instances run side by side (ONNX
Runtime and PyTorch release the GIL while they compute).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from despina.common import busypoll, dtypes, outbox, streams
from despina.common import messages as m
from despina.common.batching import BatchRules, batch_rules, batch_size, plan_batch
from despina.common.cuda import CudaMapper
from despina.common.errors import Code, ServerError, internal, invalid_arg, unavailable
from despina.common.shm.arena import ShmArena, ShmMapper, arena_prefix
from despina.services.backend_host.backend import (
    Backend,
    ExecRequest,
    ExecResponse,
    InstanceSpec,
    ModelInstance,
    config_dict,
)
from despina.services.backend_host.classification import classify, load_labels
from despina.services.flags import INLINE_THRESHOLD

log = logging.getLogger("despina.backend_host")


HEARTBEAT_INTERVAL_S = 0.2

# An instance whose executions take less than this (moving average) runs on the loop
# when nothing else is executing on this host, even where instances have threads: a
# hand-off to a thread and back costs ~100 us of CPU and wall time on a 2-vCPU VM
# (two wake-ups), several times what a small model's execution takes.
INLINE_BELOW_S = 200e-6

# An execution on the loop whose instance takes at least this long (moving average) waits
# for the next loop iteration instead of running inside the burst that brought it: the
# loop reads its sockets in between, so a Cancel for the requests still waiting is seen
# before they run. One loop iteration (~15 us) is noise beside such an execution; below
# this, executions run at once, as they always did.
YIELD_ABOVE_S = 2e-3


class LocalBatcher:
    """Direct requests for one instance of a dynamically batched model, waiting for it:
    the next batch goes when the instance is free and the queue holds a full batch (the
    max or a preferred size) or its oldest request has waited the queue delay. One
    batch runs at a time (the host is where it runs: nothing to send ahead). Loop only."""

    __slots__ = ("rules", "queue", "arrivals", "running", "pumping", "timer")

    def __init__(self, rules: BatchRules) -> None:
        self.rules = rules
        self.queue: deque[tuple[m.Infer, ExecRequest]] = deque()
        self.arrivals: deque[float] = deque()
        self.running = False
        self.pumping = False
        self.timer: asyncio.TimerHandle | None = None

    def add(self, req: m.Infer, exec_req: ExecRequest) -> None:
        self.queue.append((req, exec_req))
        self.arrivals.append(time.monotonic())

    def next_batch(self) -> tuple[int, float]:
        """(requests to run now, 0) or (0, seconds until the oldest has waited enough)."""
        rules = self.rules
        count, full = plan_batch(
            [batch_size(req) for req, _ in self.queue], rules.max_batch_size, rules.preferred
        )
        waited = time.monotonic() - self.arrivals[0]
        if full or waited >= rules.delay_s:
            return count, 0.0
        return 0, rules.delay_s - waited

    def take(self, count: int) -> list[tuple[m.Infer, ExecRequest]]:
        for _ in range(count):
            self.arrivals.popleft()
        return [self.queue.popleft() for _ in range(count)]


@dataclass(eq=False)
class LoadedInstance:
    instance: ModelInstance
    spec: InstanceSpec
    executor: concurrent.futures.ThreadPoolExecutor | None = None
    # Moving average of the execution time in seconds; starts high, so that a model is
    # first run on its thread and proves itself quick there.
    cost_s: float = 1.0
    _labels: dict[str, list[str]] | None = None
    _batched: bool | None = None
    batcher: LocalBatcher | None = None

    def __post_init__(self) -> None:
        rules = batch_rules(config_dict(self.spec.config))
        if rules is not None:
            self.batcher = LocalBatcher(rules)

    def labels(self, output: str) -> list[str]:
        """The classification labels of ``output`` (its ``label_filename``), read once."""
        if self._labels is None:
            self._labels = {
                o["name"]: load_labels(self.spec.model_dir, o.get("label_filename", ""))
                for o in config_dict(self.spec.config).get("output", ())
            }
        return self._labels.get(output, [])

    def classify(self, req: m.Infer, response: ExecResponse) -> None:
        """Replace the outputs the request asked classes of by their top-k classes."""
        if response.error is not None:
            return
        if self._batched is None:
            self._batched = config_dict(self.spec.config).get("max_batch_size", 0) > 0
        batched = self._batched
        try:
            for name, k in req.classification.items():
                if name in response.outputs:
                    values = np.asarray(response.outputs[name])
                    response.outputs[name] = classify(values, k, batched, self.labels(name), name)
        except ServerError as exc:
            response.outputs.clear()
            response.error = exc


def instance_specs(load: m.LoadModel) -> list[InstanceSpec]:
    """One spec per instance index, with the kind and device of its instance group."""
    from despina.common.protos import model_config_pb2 as mc

    config = mc.ModelConfig()
    config.ParseFromString(load.config)
    placements: list[tuple[str, int]] = []
    for group in config.instance_group:
        kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
        gpus = list(group.gpus) or [0]
        for i in range(group.count):
            placements.append((kind, gpus[i % len(gpus)]))
    return [
        InstanceSpec(
            model_name=load.model,
            version=load.version,
            model_dir=Path(load.model_dir),
            config=config,
            instance_index=index,
            kind=placements[index][0] if index < len(placements) else "KIND_CPU",
            device_id=placements[index][1] if index < len(placements) else 0,
        )
        for index in load.instances
    ]


class BackendHost:
    """Runs model instances for one framework. All methods run on the loop's thread
    except the instance executions handed to executors."""

    def __init__(
        self,
        scheduler_endpoint: str,
        framework: str,
        backend: Backend | None,
        *,
        host_id: str | None = None,
        instance_of: tuple[str, str, int] | None = None,
        busy_poll_s: float = 0.0,
    ) -> None:
        self.scheduler_endpoint = scheduler_endpoint
        self.framework = framework
        self.backend = backend
        self.host_id = host_id or f"{framework}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.instance_of = instance_of
        self.instances: dict[tuple[str, str, int], LoadedInstance] = {}
        # Read-only for inputs, so no backend can write into a client's input region;
        # read-write only for the client output regions encode_response fills.
        self.mapper = ShmMapper(capacity=16)
        self.cuda = CudaMapper()  # opens clients' CUDA IPC handles, only when one is used
        # Outputs this large go into this host's arena when the frontend shares /dev/shm
        # (a unix-socket reply endpoint); the frontend releases them after sending.
        self.arena = ShmArena(arena_prefix("bh"))
        self.arena_threshold = INLINE_THRESHOLD
        self._decode_frontend = m.decoder(m.HostFromFrontend).decode
        # Arena blocks sent to each frontend and not released yet: freed if it goes away.
        self._lent: dict[str, set[tuple[str, int]]] = {}
        self._encode = m.encoder().encode
        self._decode = m.decoder(m.HostInbound).decode
        self._reply_streams: dict[str, streams.LazyStream] = {}
        self._undelivered: list[tuple[str, int, str, str]] = []
        self._stopping = asyncio.Event()
        self._inflight = 0
        self._to_pump: set[LoadedInstance] = set()  # local batchers this burst added to
        # Executions handed to a thread or deferred to a later loop iteration, by id, until
        # they finish: where a Cancel looks for requests that may not have started yet.
        self._backlog: dict[int, m.Execution] = {}
        # Executions on the loop waiting for their turn (YIELD_ABOVE_S), in order.
        self._deferred: deque[tuple[LoadedInstance, m.Execution, list, LoadedInstance | None, bool]]
        self._deferred = deque()
        self._deferred_armed = False
        # (reply_to, rid) of backlog requests whose clients went away: dropped when their
        # execution starts, forgotten when it finishes. Read by instance threads.
        self._cancelled: set[tuple[str, int]] = set()
        self._link: streams.FramedProtocol | None = None
        self._outbox: outbox.Outbox | None = None
        self._busy_poll_s = busy_poll_s
        self._poll: busypoll.BusyPoll | None = None
        self._load_error = ""
        # Extra control handlers (the Python launcher overrides loading).
        self.on_load: Callable[[m.LoadModel], None] | None = None
        self.on_unload: Callable[[m.UnloadModel], None] | None = None
        self.on_rejoin: Callable[[], None] | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def run(self, load_error: str = "") -> None:
        """Serve until stopped. Connects to the scheduler (retrying until it listens),
        and after losing it drops every instance and joins again; a Python instance
        process returns instead, and its launcher decides."""
        self._outbox = outbox.Outbox(self._flush)
        # Idle after answering a few: poll for the next request instead of sleeping. Not
        # while an execution runs on a thread: polling would hold the GIL it needs.
        self._poll = busypoll.BusyPoll(self._busy_poll_s, lambda: not self._inflight)
        self._load_error = load_error
        backoff = 0.05
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
                backoff = min(2.0, backoff * 2)
                continue
            backoff = 0.05
            self._hello()
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
            for key in list(self.instances):
                self._unload_instance(key)
            if self.on_rejoin is not None:
                self.on_rejoin()
        await self._drain()
        for key in list(self.instances):
            self._unload_instance(key)
        for stream in self._reply_streams.values():
            stream.close()
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
        while (self._inflight or self._queued()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # --- inbound ------------------------------------------------------------------------

    def _on_burst(self, burst: list[list]) -> None:
        assert self._outbox is not None
        with self._outbox.gathering:  # the burst's replies leave when it is handled
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
                self._cancel(msg)
            elif isinstance(msg, m.LoadModel):
                if self.on_load is not None:
                    self.on_load(msg)
                else:
                    asyncio.get_running_loop().create_task(self._load(msg))
            elif isinstance(msg, m.UnloadModel):
                if self.on_unload is not None:
                    self.on_unload(msg)
                for key in [k for k in self.instances if k[:2] == (msg.model, msg.version)]:
                    self._unload_instance(key)
            elif isinstance(msg, m.Introduce):
                hello = self._encode(m.HostLink(self.host_id))
                for endpoint in msg.endpoints:
                    self._reply_stream(endpoint).send([hello])

    # --- loading ----------------------------------------------------------------------------

    async def _load(self, msg: m.LoadModel) -> None:
        assert self.backend is not None
        loop = asyncio.get_running_loop()
        loaded: list[int] = []
        error = ""
        try:
            for spec in instance_specs(msg):
                instance = await loop.run_in_executor(None, self.backend.load, spec)
                self.instances[(msg.model, msg.version, spec.instance_index)] = LoadedInstance(
                    instance, spec
                )
                loaded.append(spec.instance_index)
        except ServerError as exc:
            error = exc.message
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("loading '%s' failed:\n%s", msg.model, traceback.format_exc())
        if error:
            for index in loaded:
                self._unload_instance((msg.model, msg.version, index))
            loaded = []
        self._rebalance_threads()
        self._send(m.LoadResult(msg.model, msg.version, loaded, error))
        if not error:
            log.info("loaded '%s' version %s: %d instance(s)", msg.model, msg.version, len(loaded))

    def add_instance(self, spec: InstanceSpec, instance: ModelInstance) -> None:
        key = (spec.model_name, spec.version, spec.instance_index)
        self.instances[key] = LoadedInstance(instance, spec)
        self._rebalance_threads()

    def _rebalance_threads(self) -> None:
        """A lone instance runs on the loop; several get one thread each."""
        threaded = len(self.instances) > 1
        for key, li in self.instances.items():
            if threaded and li.executor is None:
                li.executor = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix=f"{key[0]}_{key[2]}"
                )
            elif not threaded and li.executor is not None:
                li.executor.shutdown(wait=False)
                li.executor = None

    def _queued(self) -> int:
        return sum(len(li.batcher.queue) for li in self.instances.values() if li.batcher)

    def _unload_instance(self, key: tuple[str, str, int]) -> None:
        li = self.instances.pop(key, None)
        if li is None:
            return
        batcher = li.batcher
        if batcher is not None and batcher.queue:
            if batcher.timer is not None:
                batcher.timer.cancel()
            waiting = [req for req, _ in batcher.take(len(batcher.queue))]
            self._finish(
                m.Execution(key[0], key[1], key[2], waiting),
                None,
                ServerError(
                    Code.UNAVAILABLE,
                    f"model '{key[0]}' instance {key[2]} was unloaded before the request ran",
                ),
            )
        try:
            li.instance.unload()
        except Exception:
            log.exception("unloading %s failed", key)
        if li.executor is not None:
            li.executor.shutdown(wait=False)

    # --- execution ----------------------------------------------------------------------------

    def _start(self, execution: m.Execution, frames: list) -> None:
        """Run (or queue) one execution. Whatever goes wrong with one request becomes
        that request's error reply; the rest of the execution and of the burst go on."""
        try:
            self._start_execution(execution, frames)
        except Exception as exc:  # a bug: still answer, once, every request not answered
            log.error("starting an execution failed:\n%s", traceback.format_exc())
            self._finish(execution, None, internal(f"{type(exc).__name__}: {exc}"))

    def _start_execution(self, execution: m.Execution, frames: list) -> None:
        li = self.instances.get((execution.model, execution.version, execution.instance))
        if li is None:
            self._finish(
                execution,
                None,
                ServerError(
                    Code.UNAVAILABLE,
                    f"model '{execution.model}' instance {execution.instance} is not loaded on this host",
                ),
            )
            return
        mixed = False
        try:
            requests: list = [self._exec_request(req, frames) for req in execution.requests]
        except Exception:
            # Some request's inputs cannot be read as its shapes say: that request is
            # answered with its error, the others run (no try per request on the way).
            requests = [self._exec_request_or_error(req, frames) for req in execution.requests]
            mixed = True
        batcher = li.batcher
        if batcher is not None and execution.requests and not execution.requests[0].sid:
            # Direct requests of a batched model: into the queue; the caller pumps it
            # once the whole burst is in, so one wake's requests can share a batch.
            for req, exec_req in zip(execution.requests, requests):
                if type(exec_req) is ExecResponse:
                    self._finish(
                        m.Execution(execution.model, execution.version, execution.instance, [req]),
                        [exec_req],
                        None,
                    )
                else:
                    batcher.add(req, exec_req)
            self._to_pump.add(li)
            return
        self._launch(li, execution, requests, mixed=mixed)

    def _exec_request_or_error(self, req: m.Infer, frames: list) -> ExecRequest | ExecResponse:
        """``_exec_request``, or the request's error reply when its inputs are unusable."""
        try:
            return self._exec_request(req, frames)
        except ServerError as exc:
            return ExecResponse(error=exc)
        except (ValueError, TypeError, IndexError, OverflowError, MemoryError) as exc:
            return ExecResponse(error=invalid_arg(f"{type(exc).__name__}: {exc}"))
        except Exception as exc:
            log.error("reading request %d's inputs failed:\n%s", req.rid, traceback.format_exc())
            return ExecResponse(error=internal(f"{type(exc).__name__}: {exc}"))

    def _launch(
        self,
        li: LoadedInstance,
        execution: m.Execution,
        requests: list,
        batched: LoadedInstance | None = None,
        mixed: bool = False,
    ) -> None:
        """Run one execution: on the loop when that is cheaper, else on the instance's
        thread; a slow one on the loop waits for the next loop iteration (YIELD_ABOVE_S).
        ``batched``: the instance whose LocalBatcher formed it (pumped after). ``mixed``:
        some of ``requests`` are already answered (an ``ExecResponse``, not run)."""
        inline = li.executor is None or (not self._inflight and li.cost_s < INLINE_BELOW_S)
        self._inflight += 1
        if inline and li.cost_s < YIELD_ABOVE_S and not self._deferred:
            if mixed:
                result = _run_execution(li, execution, requests, None, True)
            else:
                result = _timed_run(li, requests)
            self._finish(execution, *result, started=True, batched=batched)
            return
        self._backlog[id(execution)] = execution
        if inline:
            self._deferred.append((li, execution, requests, batched, mixed))
            if not self._deferred_armed:
                self._deferred_armed = True
                asyncio.get_running_loop().call_soon(self._run_deferred)
            return
        try:
            future = asyncio.get_running_loop().run_in_executor(
                li.executor, _run_execution, li, execution, requests, self._cancelled, mixed
            )
        except RuntimeError as exc:  # the instance's thread stopped: it was unloaded
            self._finish(execution, None, unavailable(str(exc)), started=True, batched=batched)
            return
        future.add_done_callback(
            lambda f: self._finish(execution, *f.result(), started=True, batched=batched)
        )

    def _run_deferred(self) -> None:
        """Run the oldest deferred execution; the next waits for another loop iteration."""
        self._deferred_armed = False
        li, execution, requests, batched, mixed = self._deferred.popleft()
        assert self._outbox is not None
        try:
            with self._outbox.gathering:  # its replies leave as soon as it is done
                result = _run_execution(li, execution, requests, self._cancelled, mixed)
                self._finish(execution, *result, started=True, batched=batched)
        finally:
            if self._deferred and not self._deferred_armed:
                self._deferred_armed = True
                asyncio.get_running_loop().call_soon(self._run_deferred)

    def _cancel(self, msg: m.Cancel) -> None:
        """The clients of ``msg``'s requests went away: a request still waiting in a
        local batcher is answered CANCELLED now; one waiting for its execution to start
        (deferred, or queued on its instance's thread) is dropped when it would start.
        A running or finished request is not touched. Loop only."""
        keys = {(msg.reply_to, rid) for rid in msg.rids}
        error = ServerError(Code.CANCELLED, "the request was cancelled before it ran")
        for li in list(self.instances.values()):
            batcher = li.batcher
            if batcher is None or not batcher.queue:
                continue
            if not any((req.reply_to, req.rid) in keys for req, _ in batcher.queue):
                continue
            kept = [
                (entry, t)
                for entry, t in zip(batcher.queue, batcher.arrivals)
                if (entry[0].reply_to, entry[0].rid) not in keys
            ]
            dropped = [req for req, _ in batcher.queue if (req.reply_to, req.rid) in keys]
            batcher.queue = deque(entry for entry, _ in kept)
            batcher.arrivals = deque(t for _, t in kept)
            spec = li.spec
            self._finish(
                m.Execution(spec.model_name, spec.version, spec.instance_index, dropped),
                None,
                error,
            )
        for execution in self._backlog.values():
            for req in execution.requests:
                key = (req.reply_to, req.rid)
                if key in keys:
                    self._cancelled.add(key)

    def _pump(self, li: LoadedInstance) -> None:
        """Run the instance's next local batches while it is free and one is due."""
        batcher = li.batcher
        assert batcher is not None
        if batcher.pumping:
            return  # a batch that ran on the loop finished inside this pump's loop
        if batcher.timer is not None:
            batcher.timer.cancel()
            batcher.timer = None
        batcher.pumping = True
        try:
            spec = li.spec
            while batcher.queue and not batcher.running:
                if (
                    self.instances.get((spec.model_name, spec.version, spec.instance_index))
                    is not li
                ):
                    return  # unloaded; its queue was answered then
                count, wait_s = batcher.next_batch()
                if not count:
                    batcher.timer = asyncio.get_running_loop().call_later(wait_s, self._pump, li)
                    return
                batch = batcher.take(count)
                execution = m.Execution(
                    spec.model_name, spec.version, spec.instance_index, [r for r, _ in batch]
                )
                batcher.running = True
                self._launch(li, execution, [e for _, e in batch], batched=li)
        finally:
            batcher.pumping = False

    def _exec_request(self, req: m.Infer, frames: list) -> ExecRequest:
        inputs = {}
        for tensor in req.inputs:
            ref = tensor.ref
            if isinstance(ref, m.Inline):
                buf = frames[ref.frame]
            elif isinstance(ref, m.Shm):
                buf = self.mapper.view(ref.key, ref.offset, ref.size)
            elif isinstance(ref, m.CudaIpc):
                buf = self.cuda.read(ref.handle, ref.device_id, ref.offset, ref.size)
            else:
                raise invalid_arg(f"input '{tensor.name}' names an unresolved region")
            inputs[tensor.name] = to_array(tensor.datatype, tensor.shape, buf)
        return ExecRequest(req.request_id, inputs, req.outputs, dict(req.parameters))

    def _finish(
        self,
        execution: m.Execution,
        responses: list[ExecResponse] | None,
        batch_error: ServerError | None,
        started: bool = False,
        batched: LoadedInstance | None = None,
    ) -> None:
        """Answer every request of ``execution``, each with its own reply: a request
        whose outputs cannot be encoded gets its error, the others their outputs."""
        if started:
            self._inflight -= 1
            if self._backlog:
                self._backlog.pop(id(execution), None)
        assert self._outbox is not None
        cancelled = self._cancelled
        for i, req in enumerate(execution.requests):
            try:
                if batch_error is not None:
                    reply = _error_reply(req, batch_error.code.value, batch_error.message)
                else:
                    assert responses is not None
                    if req.classification:
                        li = self.instances.get(
                            (execution.model, execution.version, execution.instance)
                        )
                        if li is not None:
                            li.classify(req, responses[i])
                    reply = encode_response(
                        req,
                        responses[i],
                        self.mapper,
                        self.cuda,
                        self.arena if _shares_shm(req.reply_to) else None,
                        self.arena_threshold,
                    )
            except Exception as exc:
                log.error("encoding the reply to %d failed:\n%s", req.rid, traceback.format_exc())
                reply = _error_reply(req, Code.INTERNAL.value, f"{type(exc).__name__}: {exc}")
            if cancelled:
                cancelled.discard((req.reply_to, req.rid))
            self._outbox.put(req.reply_to, reply)
        sids = [r.sid for r in execution.requests if r.sid]
        if sids:  # a direct request (sid 0) is its frontend's to track, not the scheduler's
            self._outbox.put(None, (execution.model, execution.version, execution.instance, sids))
        if batched is not None and batched.batcher is not None:
            batched.batcher.running = False
            self._pump(batched)

    def _flush(self, pending: dict) -> None:
        done = pending.pop(None, None)
        for endpoint, replies in pending.items():
            frames = outbox.FrameList()
            records = []
            blocks: list[tuple[str, int]] = []
            for reply, buffers in replies:
                frames.inline(reply.outputs, buffers)
                records.append(reply)
                if None in buffers:  # outputs in shared memory: this arena's are lent
                    blocks.extend(
                        (t.ref.key, t.ref.offset)
                        for t in reply.outputs
                        if isinstance(t.ref, m.Shm) and t.ref.key.startswith(self.arena.prefix)
                    )
            if blocks:
                self._lent.setdefault(endpoint, set()).update(blocks)
            self._reply_stream(endpoint).send(
                frames.finish(self._encode(m.ReplyBatch(records))), (records, endpoint, blocks)
            )
        if done or self._undelivered:
            undelivered, self._undelivered = self._undelivered, []
            self._send(m.Completion(self.host_id, done or [], undelivered))
        replies = sum(len(r) for r in pending.values())
        if replies <= busypoll.LIGHT_LOAD and not self._inflight and not self._queued():
            assert self._poll is not None
            self._poll.arm()

    def _reply_stream(self, endpoint: str) -> streams.LazyStream:
        stream = self._reply_streams.get(endpoint)
        if stream is None:
            stream = streams.LazyStream(
                endpoint,
                self._on_frontend_burst,
                self._on_undelivered,
                on_lost=lambda _link, endpoint=endpoint: self._reclaim(endpoint),
            )
            self._reply_streams[endpoint] = stream
        return stream

    def _on_frontend_burst(self, link: streams.FramedProtocol, burst: list[list]) -> None:
        """Direct requests, and releases of output blocks the frontend has sent on. The
        burst's replies leave when it is handled: a loop iteration later costs ~15 µs at
        c=1."""
        assert self._outbox is not None
        with self._outbox.gathering:
            try:
                self._on_frontend_messages(link, burst)
            finally:
                to_pump, self._to_pump = self._to_pump, set()
                for li in to_pump:
                    self._pump(li)

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
                self._cancel(msg)
                continue
            for endpoint, stream in self._reply_streams.items():
                if stream.link is link:
                    self._give_back(endpoint, msg.blocks)
                    break

    def _give_back(self, endpoint: str, blocks: list[tuple[str, int]]) -> None:
        lent = self._lent.get(endpoint, set())
        for block in blocks:
            if block in lent:
                lent.discard(block)
                self.arena.release(*block)

    def _reclaim(self, endpoint: str) -> None:
        """The frontend's stream closed: what it had not released is free again."""
        self._give_back(endpoint, list(self._lent.pop(endpoint, ())))
        self._reply_streams.pop(endpoint, None)

    def _on_undelivered(self, tags: list) -> None:
        """Replies that could not reach their frontend: the scheduler tells it instead,
        and their arena blocks are free again."""
        for tag in tags:
            if tag is None:
                continue  # a HostLink the frontend did not get: it keeps using the scheduler
            records, endpoint, blocks = tag
            self._undelivered.extend((endpoint, r.rid, r.model, r.version) for r in records)
            self._give_back(endpoint, blocks)
        self._flush({})


def _timed_run(
    li: LoadedInstance, requests: list[ExecRequest]
) -> tuple[list[ExecResponse] | None, ServerError | None]:
    """``_run``, keeping ``li.cost_s`` (the placement hint for the next executions)."""
    start = time.perf_counter()
    try:
        return _run(li.instance, requests)
    finally:
        li.cost_s += (time.perf_counter() - start - li.cost_s) / 8


def _run_execution(
    li: LoadedInstance,
    execution: m.Execution,
    requests: list,
    cancelled: set[tuple[str, int]] | None,
    mixed: bool = True,
) -> tuple[list[ExecResponse] | None, ServerError | None]:
    """``_timed_run`` of the requests still to run: those whose client went away
    (``cancelled``, read as the execution starts) are answered CANCELLED and those
    already answered (an ``ExecResponse`` in ``requests``; ``mixed`` says there may be
    some) keep their answer. On the loop or the instance's thread."""
    if cancelled and any((req.reply_to, req.rid) in cancelled for req in execution.requests):
        mixed = True
        requests = [
            _CANCELLED if (req.reply_to, req.rid) in cancelled else r
            for req, r in zip(execution.requests, requests)
        ]
    if not mixed:
        return _timed_run(li, requests)
    live = [r for r in requests if type(r) is not ExecResponse]
    if len(live) == len(requests):
        return _timed_run(li, requests)
    if not live:
        return requests, None
    responses, error = _timed_run(li, live)
    answers = iter(responses) if responses is not None else None
    failed = ExecResponse(error=error)
    return [
        r if type(r) is ExecResponse else (next(answers) if answers else failed) for r in requests
    ], None


def _run(
    instance: ModelInstance, requests: list[ExecRequest]
) -> tuple[list[ExecResponse] | None, ServerError | None]:
    """Execute one batch; any failure becomes data for the replies."""
    try:
        responses = instance.execute(requests)
    except ServerError as exc:
        return None, exc
    except Exception as exc:
        log.error("execution failed:\n%s", traceback.format_exc())
        return None, internal(f"{type(exc).__name__}: {exc}")
    if len(responses) != len(requests):
        return None, internal(
            f"the model returned {len(responses)} responses for {len(requests)} requests"
        )
    return responses, None


_CANCELLED = ExecResponse(
    error=ServerError(Code.CANCELLED, "the request was cancelled before it ran")
)


def to_array(datatype: str, shape: list[int], buf: bytes | memoryview) -> np.ndarray:
    """A numpy view over tensor bytes (a parsed copy for BYTES)."""
    if datatype == "BYTES":
        return dtypes.deserialize_bytes(buf, dtypes.element_count(shape)).reshape(shape)
    return np.frombuffer(buf, dtype=dtypes.to_numpy(datatype)).reshape(shape)


def _shares_shm(endpoint: str) -> bool:
    """A unix-socket peer is on this machine and sees this /dev/shm; a TCP peer may not
    (another container or machine), so its outputs travel inline."""
    return endpoint.startswith(("unix://", "ipc://"))


def _error_reply(req: m.Infer, code: str, message: str) -> tuple[m.InferReply, list]:
    return m.InferReply(req.rid, req.model, req.version, [], m.Error(code, message)), []


# Outputs up to this size are copied into bytes (one call, ~0.1 µs) rather than viewed
# in place (~1.5 µs of numpy calls): the copy is cheaper until it is tens of KiB.
COPY_BELOW = 16 * 1024


def encode_response(
    req: m.Infer,
    response: ExecResponse,
    mapper: ShmMapper,
    cuda: CudaMapper | None = None,
    arena: ShmArena | None = None,
    arena_threshold: int = INLINE_THRESHOLD,
) -> tuple[m.InferReply, list]:
    """The reply record and its output buffers (None where the output is already in
    shared memory: the client's region when it asked for one, else, for large outputs,
    this host's arena; either way one copy, and the block's owner frees it)."""
    if response.error is not None:
        return _error_reply(req, response.error.code.value, response.error.message)
    missing = [n for n in req.outputs if n not in response.outputs]
    if missing:
        return _error_reply(
            req, Code.INTERNAL.value, f"the model did not produce requested output(s) {missing}"
        )
    tensors: list[m.Tensor] = []
    buffers: list = []
    wanted = req.outputs
    targets = req.output_targets
    try:
        for name, value in response.outputs.items():
            if wanted and name not in wanted:
                continue
            arr = value if type(value) is np.ndarray else np.asarray(value)
            datatype = dtypes.from_numpy(arr.dtype)
            if datatype == "BYTES":
                buf: bytes | memoryview = dtypes.serialize_bytes(arr)
            elif arr.nbytes <= COPY_BELOW:
                buf = arr.tobytes()
            else:
                buf = np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data
            shape = list(arr.shape)
            target = targets.get(name) if targets else None
            if isinstance(target, (m.Shm, m.CudaIpc)):
                size = len(buf)
                if size > target.size:
                    raise invalid_arg(
                        f"shared memory size specified with the request for output '{name}' "
                        f"({target.size} bytes) should be at least {size} bytes to hold the "
                        "results"
                    )
                if isinstance(target, m.Shm):
                    mapper.write(target.key, target.offset, buf)  # pwrite: no SIGBUS
                    ref: m.TensorRef = m.Shm(target.key, target.offset, size)
                else:
                    assert cuda is not None
                    cuda.write(target.handle, target.device_id, target.offset, buf)
                    ref = m.CudaIpc(target.handle, target.device_id, target.offset, size)
                tensors.append(m.Tensor(name, datatype, shape, ref))
                buffers.append(None)
            elif arena is not None and len(buf) >= arena_threshold:
                key, offset, view = arena.allocate(len(buf))
                view[: len(buf)] = buf
                tensors.append(m.Tensor(name, datatype, shape, m.Shm(key, offset, len(buf))))
                buffers.append(None)
            else:
                tensors.append(m.Tensor(name, datatype, shape, m.Inline(0)))
                buffers.append(buf)
    except Exception as exc:
        if arena is not None:  # blocks taken for this reply's earlier outputs
            for t in tensors:
                if isinstance(t.ref, m.Shm) and t.ref.key.startswith(arena.prefix):
                    arena.release(t.ref.key, t.ref.offset)
        if isinstance(exc, ServerError):
            return _error_reply(req, exc.code.value, exc.message)
        log.error("encoding the reply to %d failed:\n%s", req.rid, traceback.format_exc())
        return _error_reply(req, Code.INTERNAL.value, f"{type(exc).__name__}: {exc}")
    return m.InferReply(req.rid, req.model, req.version, tensors), buffers
