"""A backend host's loaded model instances and how their executions run.

``Executor`` holds the instances this host loaded, reads each request's inputs as numpy
views (inline frames, shared memory, CUDA IPC), batches direct requests of a dynamically
batched model (``common.batching.Batcher``, as the scheduler's batcher would), runs each
execution on the loop or on its instance's thread, drops requests whose clients went
away before they start, and hands every result to ``Replies.answer``.

Instances run on the loop's thread when the host has a single instance (no thread hop),
otherwise each instance has a thread of its own so instances run side by side (ONNX
Runtime and PyTorch release the GIL while they compute); a quick instance still runs on
the loop while nothing else executes (see docs/architecture.md#where-executions-run).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import logging
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from despina.common import dtypes, trace_stamps
from despina.common import messages as m
from despina.common.batching import Batcher, batch_rules, batch_size
from despina.common.cuda import CudaMapper
from despina.common.errors import Code, ServerError, internal, invalid_arg, unavailable
from despina.common.shm.arena import ShmMapper
from despina.common.stats import COUNT_AT, Recorder
from despina.services.backend_host.backend import (
    ExecRequest,
    ExecResponse,
    InstanceSpec,
    ModelInstance,
    config_dict,
)
from despina.services.backend_host.classification import classify, load_labels
from despina.services.backend_host.replies import Replies

log = logging.getLogger("despina.backend_host")

# Below this moving-average execution time, an instance runs on the loop while nothing
# else executes: docs/architecture.md#where-executions-run.
INLINE_BELOW_S = 200e-6

# From this moving-average execution time, an execution on the loop waits for the next
# loop iteration, so a Cancel read in between is seen: docs/architecture.md#where-executions-run.
YIELD_ABOVE_S = 2e-3

InstanceKey = tuple[str, str, int]  # (model, version, instance index)


@dataclass(eq=False)
class LoadedInstance:
    instance: ModelInstance
    spec: InstanceSpec
    executor: concurrent.futures.ThreadPoolExecutor | None = None
    # Moving average of the execution time in seconds; starts high, so that a model is
    # first run on its thread and proves itself quick there.
    cost_s: float = 1.0
    _labels: dict[str, list[str]] | None = None
    # max_batch_size > 0: a request's first dimension is its batch size.
    batched: bool = field(init=False)
    # Direct requests waiting for a batch (a dynamically batched model), each with its
    # arrays; ``running``: a batch of them is executing (one at a time); ``pumping``:
    # ``Executor.pump`` is forming batches for this instance now.
    batcher: Batcher[tuple[m.Infer, ExecRequest]] | None = None
    running: bool = False
    pumping: bool = False
    # Statistics: seconds spent reading the inputs of the direct requests now waiting in
    # the batcher (the next batch it forms is counted them).
    input_s: float = 0.0
    # A decoupled model (a Python model's response senders): its requests are answered by
    # ``Replies.send_part``, each one's records handed to the instance (``accept``).
    decoupled: bool = False
    # Statistics: this instance's executions answered since the last flush, eight
    # numbers each in one flat list (``Executor._count``, common/stats.Recorder.executions).
    uncounted: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.batched = config_dict(self.spec.config).get("max_batch_size", 0) > 0

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
        batched = self.batched
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
            kind=placements[at][0] if at < len(placements) else "KIND_CPU",
            device_id=placements[at][1] if at < len(placements) else 0,
        )
        for index in load.instances
        # A reload's indexes, another host's: the same groups (scheduler/placement.py).
        for at in (index % m.INSTANCE_STRIDE % max(len(placements), 1),)
    ]


class Executor:
    """The loaded instances of one host and the executions running on them. Owns each
    execution from ``start`` until its results go to ``replies.answer`` (exactly once
    per request, whatever happens). Loop only, except the executions handed to
    instance threads (``_run_execution``), which read ``_cancelled``."""

    def __init__(
        self, mapper: ShmMapper, cuda: CudaMapper, replies: Replies, loop_execution: bool = True
    ) -> None:
        """``loop_execution`` False (the speed path off, common/settings.py): every
        instance has its thread and every execution runs there."""
        self.mapper = mapper
        self.loop_execution = loop_execution
        # Off, no moving average is below it: nothing runs on the loop.
        self._inline_below = INLINE_BELOW_S if loop_execution else -1.0
        self.cuda = cuda
        self.replies = replies
        self.instances: dict[InstanceKey, LoadedInstance] = {}
        self.inflight = 0  # executions started and not finished
        self._answer = replies.answer
        self._to_pump: set[LoadedInstance] = set()  # batchers this burst added to
        # Executions handed to a thread or deferred to a later loop iteration, by id, until
        # they finish: where a Cancel looks for requests that may not have started yet.
        self._backlog: dict[int, m.Execution] = {}
        # Executions on the loop waiting for their turn (YIELD_ABOVE_S), in order.
        self._deferred: deque[
            tuple[LoadedInstance, m.Execution, list, LoadedInstance | None, bool, tuple | None]
        ]
        self._deferred = deque()
        self._deferred_armed = False
        # (reply_to, rid) of backlog requests whose clients went away: dropped when their
        # execution starts, forgotten when it finishes. Read by instance threads.
        self._cancelled: set[tuple[str, int]] = set()
        # Statistics (common/stats.py), None when not counting.
        self.stats: Recorder | None = None
        # The instances with executions to count at the next flush (``uncounted``).
        self._counting: list[LoadedInstance] = []
        # Some trace level is on (the scheduler's Settings): traced requests get their
        # QUEUE_START (direct routes) and COMPUTE_* stamps (common/trace_stamps.py).
        self.tracing = False

    # --- instances ----------------------------------------------------------------------

    def add(self, spec: InstanceSpec, instance: ModelInstance) -> None:
        li = LoadedInstance(instance, spec)
        if getattr(instance, "decoupled", False):
            li.decoupled = True
            instance.bind(self.replies)  # type: ignore[attr-defined]
            self._answer = self.replies.answer_decoupled
        rules = batch_rules(config_dict(spec.config))
        if rules is not None:
            li.batcher = Batcher(rules, functools.partial(self.pump, li))
        self.instances[(spec.model_name, spec.version, spec.instance_index)] = li
        self.rebalance_threads()

    def rebalance_threads(self) -> None:
        """A lone instance runs on the loop; several get one thread each (each always,
        without loop execution)."""
        threaded = len(self.instances) > 1 or not self.loop_execution
        for key, li in self.instances.items():
            if threaded and li.executor is None:
                li.executor = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix=f"{key[0]}_{key[2]}"
                )
            elif not threaded and li.executor is not None:
                li.executor.shutdown(wait=False)
                li.executor = None

    def queued(self) -> int:
        """Direct requests waiting in batchers."""
        return sum(len(li.batcher) for li in self.instances.values() if li.batcher)

    def pending(self) -> dict[tuple[str, str], int]:
        """Requests waiting here to run, per loaded model version (0 included): in the
        instances' batchers (direct requests), and in executions deferred to a later
        loop iteration. The statistics' ``gauges`` (Triton's pending request count)."""
        waiting: dict[tuple[str, str], int] = {}
        for li in self.instances.values():
            key = (li.spec.model_name, li.spec.version)
            waiting[key] = waiting.get(key, 0) + (len(li.batcher) if li.batcher else 0)
        for li, execution, *_ in self._deferred:
            key = (li.spec.model_name, li.spec.version)
            waiting[key] = waiting.get(key, 0) + len(execution.requests)
        return waiting

    def unload(self, key: InstanceKey) -> None:
        """Unload one instance; its waiting direct requests are answered UNAVAILABLE.
        Executions already on its thread finish there."""
        li = self.instances.pop(key, None)
        if li is None:
            return
        batcher = li.batcher
        if batcher is not None:
            waiting = [req for req, _ in batcher.drain()]
            if waiting:
                self._finish(
                    m.Execution(key[0], key[1], key[2], waiting, True),
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

    def unload_all(self) -> None:
        for key in list(self.instances):
            self.unload(key)

    # --- execution ----------------------------------------------------------------------

    def start(self, execution: m.Execution, frames: list) -> None:
        """Run (or queue) one execution. Whatever goes wrong with one request becomes
        that request's error reply; the rest of the execution and of the burst go on."""
        try:
            self._start_execution(execution, frames)
        except Exception as exc:  # a bug: still answer, once, every request not answered
            log.error("starting an execution failed:\n%s", traceback.format_exc())
            self._finish(execution, None, internal(f"{type(exc).__name__}: {exc}"))

    def pump_added(self) -> None:
        """At the end of a burst: form batches from what the burst queued, so one
        wake's direct requests can share a batch."""
        to_pump, self._to_pump = self._to_pump, set()
        for li in to_pump:
            self.pump(li)

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
        if self.tracing and execution.direct:
            trace_stamps.stamp(execution.requests, "QUEUE_START")
        mixed = False
        t0 = time.monotonic() if self.stats is not None else 0.0
        try:
            requests: list = [self._exec_request(req, frames) for req in execution.requests]
        except Exception:
            # Some request's inputs cannot be read as its shapes say: that request is
            # answered with its error, the others run (no try per request on the way).
            requests = [self._exec_request_or_error(req, frames) for req in execution.requests]
            mixed = True
        if li.decoupled:
            li.instance.accept(execution.requests, requests)  # type: ignore[attr-defined]
        batcher = li.batcher
        if batcher is not None and execution.direct:
            # Direct requests of a batched model: into the queue; the burst's handler
            # pumps it once the whole burst is in (pump_added).
            for req, exec_req in zip(execution.requests, requests):
                if type(exec_req) is ExecResponse:
                    self._finish(
                        m.Execution(
                            execution.model, execution.version, execution.instance, [req], True
                        ),
                        [exec_req],
                        None,
                    )
                else:
                    batcher.add((req, exec_req), batch_size(req))
            if t0:
                li.input_s += time.monotonic() - t0
            self._to_pump.add(li)
            return
        # Counting: its inputs began at t0, it is launched as they are read (0.0: at the
        # execute's start, unless it waits in ``_launch``), not batched here (-1.0).
        launched = (t0, 0.0, -1.0) if t0 else None
        self._launch(li, execution, requests, mixed=mixed, launched=launched)

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
        launched: tuple[float, float, float] | None = None,
    ) -> None:
        """Run one execution: on the loop when that is cheaper, else on the instance's
        thread; a slow one on the loop waits for the next loop iteration (YIELD_ABOVE_S).
        ``batched``: the instance whose batcher formed it (pumped after). ``mixed``:
        some of ``requests`` are already answered (an ``ExecResponse``, not run).
        ``launched``, when counting: when its inputs began to be read, when it was
        launched (0.0: as they were read, so the execute's start unless it waits here)
        and its requests' seconds in the host's batcher (-1.0: not batched here)."""
        if self.tracing:
            trace_stamps.stamp(execution.requests, "COMPUTE_START")
        inline = li.executor is None or (not self.inflight and li.cost_s < self._inline_below)
        self.inflight += 1
        if inline and li.cost_s < YIELD_ABOVE_S and not self._deferred:
            if mixed:
                result = _run_execution(li, execution, requests, None, True)
            else:
                result = _timed_run(li, requests)
            self._finish(execution, *result, True, batched, li, launched)
            return
        self._backlog[id(execution)] = execution
        if launched is not None and not launched[1]:  # it waits: launched now
            launched = (launched[0], time.monotonic(), launched[2])
        if inline:
            self._deferred.append((li, execution, requests, batched, mixed, launched))
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
            lambda f: self._finish(execution, *f.result(), True, batched, li, launched)
        )

    def _run_deferred(self) -> None:
        """Run the oldest deferred execution; the next waits for another loop iteration."""
        self._deferred_armed = False
        li, execution, requests, batched, mixed, launched = self._deferred.popleft()
        outbox = self.replies.outbox
        assert outbox is not None
        try:
            with outbox.gathering:  # its replies leave as soon as it is done
                result = _run_execution(li, execution, requests, self._cancelled, mixed)
                self._finish(execution, *result, True, batched, li, launched)
        finally:
            if self._deferred and not self._deferred_armed:
                self._deferred_armed = True
                asyncio.get_running_loop().call_soon(self._run_deferred)

    def _finish(
        self,
        execution: m.Execution,
        responses: list[ExecResponse] | None,
        batch_error: ServerError | None,
        ran: tuple[float, float] | None = None,
        started: bool = False,
        batched: LoadedInstance | None = None,
        li: LoadedInstance | None = None,
        launched: tuple[float, float, float] | None = None,
    ) -> None:
        """The execution is over: its results go to ``replies``, and the batcher that
        formed it (``batched``) may run its next batch. ``ran``: when the model's
        execute began and ended (time.monotonic), if it ran, on instance ``li``
        (``launched``: as ``_launch`` was given it)."""
        if started:
            self.inflight -= 1
            if self._backlog:
                self._backlog.pop(id(execution), None)
            if self.tracing:
                trace_stamps.computed(execution.requests, ran)
        if ran is not None and li is not None and self.stats is not None:
            self._count(li, execution, responses, ran, launched)
        else:
            self._answer(execution, responses, batch_error)
        self._after_answer(execution, batched)

    def _count(
        self,
        li: LoadedInstance,
        execution: m.Execution,
        responses: list[ExecResponse] | None,
        ran: tuple[float, float],
        launched: tuple[float, float, float] | None,
    ) -> None:
        """Answer ``execution`` (it ran on ``li``) and queue its numbers: eight added to
        the instance's flat list (holding the execution itself would keep its requests
        alive, work for the garbage collector), counted at the statistics' next flush
        by columns, off the request's path (``count_queued``): its times as read, the
        durations worked out there. The output time runs from the execute's end (one
        clock read fewer)."""
        self._answer(execution, responses, None)
        answered = time.monotonic()
        requests = execution.requests
        n = len(requests)
        inferences = n
        if li.batched:
            inferences = batch_size(requests[0]) if n == 1 else sum(map(batch_size, requests))
        input_at, launched_at, batched_s = launched or (ran[0], 0.0, -1.0)
        rows = li.uncounted
        if not rows:
            if not self._counting:
                stats = self.stats
                assert stats is not None
                stats.arm()
            self._counting.append(li)
        elif len(rows) >= COUNT_AT * 8:  # counted now, sent at the flush (COUNT_AT)
            self._count_instance(li)
            rows = li.uncounted
        rows += (n, inferences, input_at, launched_at, ran[0], ran[1], answered, batched_s)

    def count_queued(self) -> None:
        """Count the executions ``_count`` queued, per instance, by columns (the
        statistics' ``collect``, called at each flush)."""
        counting, self._counting = self._counting, []
        for li in counting:
            self._count_instance(li)

    def _count_instance(self, li: LoadedInstance) -> None:
        """Count the executions ``li`` queued (into the deltas the next flush sends)."""
        rows, li.uncounted = li.uncounted, []
        stats = self.stats
        if stats is not None and rows:
            wall_ms, now = time.time() * 1000, time.monotonic()  # end_ms: the wall clock's
            stats.executions(li.spec.model_name, li.spec.version, rows, wall_ms, now)

    def _after_answer(self, execution: m.Execution, batched: LoadedInstance | None) -> None:
        cancelled = self._cancelled
        if cancelled:
            for req in execution.requests:
                cancelled.discard((req.reply_to, req.rid))
        if batched is not None and batched.batcher is not None:
            batched.running = False
            self.pump(batched)

    def cancel(self, msg: m.Cancel) -> None:
        """The clients of ``msg``'s requests went away: a request still waiting in a
        batcher is answered CANCELLED now; one waiting for its execution to start
        (deferred, or queued on its instance's thread) is dropped when it would start.
        A running or finished request is not touched. Loop only."""
        keys = {(msg.reply_to, rid) for rid in msg.rids}
        error = ServerError(Code.CANCELLED, "the request was cancelled before it ran")
        for li in list(self.instances.values()):
            batcher = li.batcher
            if batcher is None or not batcher.items:
                continue
            dropped = batcher.remove(lambda entry: (entry[0].reply_to, entry[0].rid) in keys)
            if dropped:
                spec = li.spec
                self._finish(
                    m.Execution(
                        spec.model_name,
                        spec.version,
                        spec.instance_index,
                        [req for req, _ in dropped],
                        True,
                    ),
                    None,
                    error,
                )
        for execution in self._backlog.values():
            for req in execution.requests:
                key = (req.reply_to, req.rid)
                if key in keys:
                    self._cancelled.add(key)
        streaming = self.replies.streaming  # decoupled requests still sending
        if streaming:
            for key in keys:
                sender = streaming.get(key)
                if sender is not None:
                    sender.cancelled = True

    def pump(self, li: LoadedInstance) -> None:
        """Run the instance's next batches of direct requests while it is free and one
        is due; otherwise arm the batcher's timer for when one will be."""
        batcher = li.batcher
        assert batcher is not None
        if li.pumping:
            return  # a batch that ran on the loop finished inside this pump's loop
        batcher.disarm()
        li.pumping = True
        try:
            spec = li.spec
            key = (spec.model_name, spec.version, spec.instance_index)
            while batcher.items and not li.running:
                if self.instances.get(key) is not li:
                    return  # unloaded; its queue was answered then
                count = batcher.due()
                if not count:
                    batcher.arm()
                    return
                arrivals = list(itertools.islice(batcher.arrivals, count)) if self.stats else ()
                batch = batcher.take(count)
                execution = m.Execution(
                    spec.model_name,
                    spec.version,
                    spec.instance_index,
                    [r for r, _ in batch],
                    True,
                )
                li.running = True
                launched = None
                if self.stats is not None:
                    now = time.monotonic()
                    launched = (  # its share of the input seconds spent on the queue
                        now - li.input_s * len(batch) / (len(batch) + len(batcher)),
                        now,
                        sum(now - t for t in arrivals),
                    )
                    li.input_s *= len(batcher) / (len(batch) + len(batcher))
                self._launch(li, execution, [e for _, e in batch], li, launched=launched)
        finally:
            li.pumping = False


def _timed_run(
    li: LoadedInstance, requests: list[ExecRequest]
) -> tuple[list[ExecResponse] | None, ServerError | None, tuple[float, float] | None]:
    """``_run``, keeping ``li.cost_s`` (the placement hint for the next executions), and
    when it began and ended (time.monotonic; None if it failed as a whole)."""
    start = time.monotonic()
    try:
        responses, error = _run(li.instance, requests)
    finally:
        end = time.monotonic()
        li.cost_s += (end - start - li.cost_s) / 8
    return responses, error, None if error is not None else (start, end)


def _run_execution(
    li: LoadedInstance,
    execution: m.Execution,
    requests: list,
    cancelled: set[tuple[str, int]] | None,
    mixed: bool = True,
) -> tuple[list[ExecResponse] | None, ServerError | None, tuple[float, float] | None]:
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
        return requests, None, None
    responses, error, ran = _timed_run(li, live)
    answers = iter(responses) if responses is not None else None
    failed = ExecResponse(error=error)
    return (
        [
            r if type(r) is ExecResponse else (next(answers) if answers else failed)
            for r in requests
        ],
        None,
        ran,
    )


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
