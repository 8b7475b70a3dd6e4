"""Counting requests where the work happens, cheaply, and adding the counts up.

Who counts what (docs/architecture.md#statistics-and-metrics):

- a frontend counts each request it answered: success or failure (with Triton's reason)
  and its end-to-end duration, decode to reply (``Recorder.request``, from ``InferCall``);
- a backend host counts each execution it ran (``Recorder.execution``): the batch size,
  inferences, the compute input / infer / output durations and each request's queue
  time, once per batch, never per request.

Each process adds into a ``ModelStatistics`` delta per model version (common/control.py)
and sends every delta it has in one ``StatsReport`` at most every ``FLUSH_S`` while there
is something new (a timer on its loop, none when idle). The scheduler adds the deltas up
(services/scheduler/stats.py), so totals survive a reporter's restart and are exact once
the last delta arrived. Loop only: nothing here is thread-safe.
"""

from __future__ import annotations

import asyncio
import struct
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
else:

    class _Numpy:
        """numpy, imported at first use: frontends and hosts add up with it, the
        scheduler (which only merges) never loads it (tests/e2e/test_footprint.py)."""

        def __getattr__(self, name: str):
            import numpy

            globals()["np"] = numpy
            return getattr(numpy, name)

    np = _Numpy()

from despina.common import messages as m
from despina.common.control import ModelStatistics

FLUSH_S = 0.1  # the longest a count waits before it is sent
# Rows (requests or executions) counted as soon as this many wait, without sending: how
# long one count holds up the loop stays bounded (~0.1 ms) at any rate, where counting a
# whole period's rows at once at ~20k requests/s added ~0.4 ms to the p99 latency of the
# requests it held up (docs/observability.md, "What counting costs").
COUNT_AT = 512
SUCCESS_ROWS = COUNT_AT * 6  # ``Recorder.successes`` holds six values per request

# Upper bounds (le) of the per-stage histograms' buckets, in µs, then +Inf: fixed, so
# the buckets of every process add up.
BOUNDS_US = (
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    25000,
    50000,
    100000,
    250000,
    500000,
    1000000,
    2500000,
    5000000,
    10000000,
)
BOUNDS_NS = tuple(b * 1000 for b in BOUNDS_US)
_SLOTS = len(BOUNDS_NS) + 2  # the buckets, +Inf, then the sum

# The stages of despina_stage_duration_us, in a request's order: frontend_decode (a
# frontend: the call began to its request sent), batch_wait (a host: waiting in its
# batcher for a batch, direct routes), queue (a host: received, or batched, to the batch's
# start), compute_input, compute, output (a host: reading the inputs, the model's
# execute, encoding the replies), frontend_encode (a frontend: the reply came to the call
# closed), and request (a frontend: the whole, decode to reply).
STAGES = (
    "frontend_decode",
    "batch_wait",
    "queue",
    "compute_input",
    "compute",
    "output",
    "frontend_encode",
    "request",
)

_HOST_STAGES = ("queue", "compute_input", "compute", "output")  # every execution has them

# Triton's default buckets (le, in ms) of nv_inference_first_response_histogram_ms, a
# decoupled model's time from the request to its first response; a model config's
# ``model_metrics`` may set its own (``first_response_bounds``).
FIRST_RESPONSE_HISTOGRAM = "nv_inference_first_response_histogram_ms"
FIRST_RESPONSE_BOUNDS_MS = (100.0, 500.0, 2000.0, 5000.0)
# A frontend's first-response times sent at once when this many wait (bounded reports).
FIRST_RESPONSES_AT = 4096

# Triton's failure reasons (nv_inference_request_failure's ``reason``).
REJECTED, CANCELED, BACKEND, OTHER = "REJECTED", "CANCELED", "BACKEND", "OTHER"
REASONS = (REJECTED, CANCELED, BACKEND, OTHER)

# A decoupled model's response, by kind (``Recorder.response``; Triton's response_stats).
RESPONSE_SUCCESS, RESPONSE_FAIL, RESPONSE_EMPTY, RESPONSE_CANCEL = 0, 1, 2, 3


def observe(stats: ModelStatistics, stage: str, ns: int, count: int = 1) -> None:
    """``count`` observations of ``ns`` each into ``stage``'s histogram."""
    buckets = stats.stages.get(stage)
    if buckets is None:
        buckets = stats.stages[stage] = [0] * _SLOTS
    buckets[bisect_left(BOUNDS_NS, ns)] += count
    buckets[-1] += ns * count


_BOUNDS_A: list = []  # BOUNDS_NS as an int64 array, made at first use (numpy)


def _observe_array(
    stats: ModelStatistics, stage: str, values: np.ndarray, weights: np.ndarray | None = None
) -> None:
    """``observe`` of every value in ``values`` (int64 ns), each ``weights`` times (the
    same length; None: once)."""
    if not _BOUNDS_A:
        _BOUNDS_A.append(np.array(BOUNDS_NS, dtype=np.int64))
    counts = np.bincount(
        np.searchsorted(_BOUNDS_A[0], values), weights=weights, minlength=_SLOTS - 1
    ).tolist()
    buckets = stats.stages.get(stage)
    if buckets is None:
        buckets = stats.stages[stage] = [0] * _SLOTS
    for i, count in enumerate(counts):
        if count:
            buckets[i] += int(count)
    buckets[-1] += int(values.sum() if weights is None else (values * weights).sum())


def _floats(values: list) -> np.ndarray:
    """``values`` (Python floats or ints) as a float64 array: through ``struct``, three
    times faster than ``np.array`` on a list (which checks each item's type), the bulk of
    a count's time."""
    return np.frombuffer(struct.pack(f"{len(values)}d", *values), dtype=np.float64)


def _groups(*columns: list) -> list[tuple[tuple, np.ndarray | None]]:
    """Each distinct key (a value of every column at the same index) with the indexes
    where it is (None: everywhere, the usual case, checked in C)."""
    if all(column.count(column[0]) == len(column) for column in columns):
        return [(tuple(column[0] for column in columns), None)]
    keys = list(zip(*columns))
    index = dict.fromkeys(keys)
    for i, key in enumerate(index):
        index[key] = i
    codes = np.fromiter(map(index.__getitem__, keys), dtype=np.intp, count=len(keys))
    return [(key, np.flatnonzero(codes == i)) for key, i in index.items()]


def merge(into: ModelStatistics, delta: ModelStatistics) -> None:
    """Add ``delta``'s counts into ``into`` (``last_inference``: the later one)."""
    into.success_count += delta.success_count
    into.success_ns += delta.success_ns
    for reason, (count, ns) in delta.fail.items():
        entry = into.fail.setdefault(reason, [0, 0])
        entry[0] += count
        entry[1] += ns
    into.queue_count += delta.queue_count
    into.queue_ns += delta.queue_ns
    into.input_count += delta.input_count
    into.input_ns += delta.input_ns
    into.infer_count += delta.infer_count
    into.infer_ns += delta.infer_ns
    into.output_count += delta.output_count
    into.output_ns += delta.output_ns
    into.inference_count += delta.inference_count
    into.execution_count += delta.execution_count
    into.last_inference = max(into.last_inference, delta.last_inference)
    for size, values in delta.batch.items():
        entry = into.batch.setdefault(size, [0, 0, 0, 0])
        for i, value in enumerate(values[:4]):
            entry[i] += value
    for index, values in delta.responses.items():
        entry = into.responses.setdefault(index, [0] * 8)
        for i, value in enumerate(values[:8]):
            entry[i] += value
    for stage, buckets in delta.stages.items():
        if len(buckets) != _SLOTS:
            continue  # a peer with other bounds: its buckets would not add up
        entry = into.stages.setdefault(stage, [0] * _SLOTS)
        for i, value in enumerate(buckets):
            entry[i] += value
    if delta.first_response_ns:
        into.first_response_ns.extend(delta.first_response_ns)
    if delta.first_response:
        buckets = _first_histogram(into, delta.first_response_le)
        for i, value in enumerate(delta.first_response):
            buckets[i] += value


def _first_histogram(into: ModelStatistics, bounds: list[float]) -> list[int]:
    """``into``'s first-response histogram on ``bounds`` (ms): its own, or a new empty
    one when it has none or had other bounds (a model reloaded with other buckets)."""
    if into.first_response_le != bounds or not into.first_response:
        into.first_response_le = list(bounds)
        into.first_response = [0] * (len(bounds) + 2)
    return into.first_response


def bin_first_responses(into: ModelStatistics, bounds: list[float]) -> None:
    """Move ``into``'s ``first_response_ns`` (times as the frontends counted them) into
    its histogram on ``bounds`` (ms; a new histogram when the bounds changed)."""
    buckets = _first_histogram(into, bounds)
    bounds_ns = [b * 1e6 for b in bounds]
    for ns in into.first_response_ns:
        buckets[bisect_left(bounds_ns, ns)] += 1
        buckets[-1] += ns
    into.first_response_ns = []


def quantile(buckets: list[int], q: float) -> float:
    """An estimate of the ``q`` quantile, in µs, from a stage's bucket counts (linear
    within the bucket, as Prometheus' histogram_quantile); 0.0 with no observation."""
    counts = buckets[:-1]
    total = sum(counts)
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(BOUNDS_US):
                return float(BOUNDS_US[-1])
            low = BOUNDS_US[i - 1] if i else 0
            return low + (BOUNDS_US[i] - low) * (rank - seen) / count
        seen += count
    return float(BOUNDS_US[-1])


class Recorder:
    """One process's deltas, per model version, and the timer that sends them: at most
    ``period_s`` after the first count since the last send, one call of ``send`` with
    every delta. Loop only.

    What a request or an execution leaves on the request path is one tuple appended to
    a list (``request``; the host's executor keeps its own, read by ``collect``): the
    adding up runs at the flush, over everything the period brought, in one warm loop.
    Measured: counting each request as it ended cost a backend host ~40 µs of CPU per
    request at concurrency 1 (cold code between two sleeps), the append costs ~1 µs."""

    __slots__ = (
        "_send",
        "_period_s",
        "_models",
        "_timer",
        "_requests",
        "successes",
        "collect",
        "gauges",
    )

    def __init__(
        self,
        send: Callable[[m.StatsReport], None],
        period_s: float = FLUSH_S,
        collect: Callable[[], None] | None = None,
        gauges: Callable[[], dict[tuple[str, str], int]] | None = None,
    ) -> None:
        """``collect``: called first at each flush, to count (``execution``) what its
        owner queued since the last one. ``gauges``: the requests waiting in its owner
        now, per (model, version), sent in the answer to a ``StatsFlush`` (each delta's
        ``pending``: the scheduler keeps the last of every process)."""
        self._send = send
        self._period_s = period_s
        self._models: dict[tuple[str, str], ModelStatistics] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._requests: list = []  # request(): six values each
        self.successes: list = []  # success(): six values each
        self.collect = collect
        self.gauges = gauges

    def arm(self) -> None:
        """Flush within ``period_s`` (once armed, the timer stands until it fires)."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._period_s, self.flush)

    def get(self, model: str, version: str) -> ModelStatistics:
        """The delta to add into for ``model`` ``version``; arms the send."""
        stats = self._models.get((model, version))
        if stats is None:
            stats = self._models[(model, version)] = ModelStatistics(model, version)
            if self._timer is None:  # the first count since the last send
                self.arm()
        return stats

    def flush(self, token: int = 0) -> None:
        """Count what is queued and send every delta now: nothing when there is none,
        unless this answers the scheduler's ``StatsFlush`` ``token`` (then a report,
        empty or not, carrying it)."""
        if self.collect is not None:
            self.collect()
        self.count_queued()
        if token and self.gauges is not None:
            for (model, version), waiting in self.gauges().items():
                if waiting:
                    self.get(model, version).pending = waiting
        if self._timer is not None:  # the one that fired, or one armed meanwhile
            self._timer.cancel()
            self._timer = None
        if self._models or token:
            models, self._models = list(self._models.values()), {}
            self._send(m.StatsReport(models, token))

    def count_queued(self) -> None:
        """Add up the requests queued since the last count (into the deltas ``flush``
        sends)."""
        requests, self._requests = self._requests, []
        if requests:
            self._count_requests(
                requests[0::6],
                requests[1::6],
                requests[2::6],
                np.array(requests[3::6], dtype=np.int64),
                requests[4::6],
                requests[5::6],
            )
        successes, self.successes = self.successes, []
        if successes:
            t0, sent, reply, now = (_floats(successes[i::6]) for i in (2, 3, 4, 5))
            # As int((b - a) * 1e9) on each, in the same float operations.
            self._count_requests(
                successes[0::6],
                successes[1::6],
                [None] * (len(successes) // 6),
                ((now - t0) * 1e9).astype(np.int64),
                np.where(sent != 0.0, ((sent - t0) * 1e9).astype(np.int64), -1),
                np.where(reply != 0.0, ((now - reply) * 1e9).astype(np.int64), -1),
            )

    # --- what a frontend counts ---------------------------------------------------------

    def request(
        self,
        model: str,
        version: str,
        ns: int,
        reason: str | None,
        decode_ns: int = -1,
        encode_ns: int = -1,
    ) -> None:
        """One request answered: ``reason`` None for a success, else Triton's reason;
        a success's decode and encode times, where known (-1: not). Counted at the
        next flush."""
        self._requests += (model, version, reason, ns, decode_ns, encode_ns)
        if self._timer is None:
            self.arm()
        elif len(self._requests) >= COUNT_AT * 6:
            self.count_queued()

    def success(
        self, model: str, version: str, t0: float, sent: float, reply: float, now: float
    ) -> None:
        """One request answered without error, from its times on ``time.monotonic`` as
        the frontend took them: began ``t0``, request sent ``sent`` and reply read
        ``reply`` (0.0: not known), closed ``now``; the durations are worked out at the
        flush (``request`` with the same numbers counts the same). ``InferCall.close``
        does the same inline: one call fewer on every request."""
        rows = self.successes
        if not rows:
            self.arm()
        rows += (model, version, t0, sent, reply, now)
        if len(rows) >= SUCCESS_ROWS:
            self.count_queued()

    def response(self, model: str, version: str, index: int, kind: int, ns: int) -> None:
        """One response of a decoupled model's request (a frontend; its ``index``-th, 0
        first), of ``kind`` (RESPONSE_*), ``ns`` after the one before it (or the request's
        start). Added at once: only decoupled calls pay it. The first one the client
        got (index 0, not a cancel) is also the request's time to first response."""
        stats = self.get(model, version)
        entry = stats.responses.get(str(index))
        if entry is None:
            entry = stats.responses[str(index)] = [0] * 8
        entry[2 * kind] += 1
        entry[2 * kind + 1] += ns
        if index == 0 and kind != RESPONSE_CANCEL:
            first = stats.first_response_ns
            first.append(ns)
            if len(first) >= FIRST_RESPONSES_AT:
                self.flush()

    def _count_requests(
        self,
        models: list,
        versions: list,
        reasons: list,
        ns_a: np.ndarray,
        decode: list | np.ndarray,
        encode: list | np.ndarray,
    ) -> None:
        """Add up a flush's requests, given by columns: per (model, version, reason), a
        few numpy calls, whatever the number of requests."""
        decode_a = np.asarray(decode, dtype=np.int64)
        encode_a = np.asarray(encode, dtype=np.int64)
        for (model, version, reason), idx in _groups(models, versions, reasons):
            stats = self.get(model, version)
            values = ns_a if idx is None else ns_a[idx]
            count, total = len(values), int(values.sum())
            if reason is not None:
                entry = stats.fail.get(reason)
                if entry is None:
                    entry = stats.fail[reason] = [0, 0]
                entry[0] += count
                entry[1] += total
                continue
            stats.success_count += count
            stats.success_ns += total
            _observe_array(stats, "request", values)
            for stage, column in (("frontend_decode", decode_a), ("frontend_encode", encode_a)):
                values = column if idx is None else column[idx]
                values = values[values >= 0]
                if len(values):
                    _observe_array(stats, stage, values)

    # --- what a backend host counts -----------------------------------------------------

    def executions(self, model: str, version: str, rows: list, wall_ms: float, now: float) -> None:
        """Count a flush's executions of ``model`` ``version`` by columns (a few numpy
        calls per batch size, whatever the number of executions). ``rows``: eight numbers
        per execution in one flat list, as the host's executor queues them per instance:
        ``(requests, inferences, input_at, launched_at, start, end, answered,
        batched_s)``, times on ``time.monotonic``: its inputs began to be read, it was
        launched (0.0: at ``start``), its execute began and ended, it was answered, and
        its requests' seconds in the host's batcher (-1.0: not batched there); read in one
        conversion. ``wall_ms`` and ``now``: one reading of the wall clock (ms) and of
        ``time.monotonic`` for the last inference's time. The same counts as
        ``execution`` on each row, given ``queue_ns`` one request's ``start -
        launched_at`` times the requests."""
        if not rows:
            return
        table = _floats(rows).reshape(-1, 8)
        gn = table[:, 0].astype(np.int64)
        ginf = table[:, 1].astype(np.int64)
        start, end = table[:, 4], table[:, 5]
        launched = table[:, 3]
        launched = np.where(launched > 0.0, launched, start)
        gq = (gn * np.maximum(start - launched, 0.0) * 1e9).astype(np.int64)
        gi, gc, go = (
            (span * 1e9).astype(np.int64)
            for span in (launched - table[:, 2], end - start, table[:, 6] - end)
        )
        batched_a = table[:, 7]
        gw = np.where(batched_a >= 0, (batched_a * 1e9).astype(np.int64), -1)
        stats = self.get(model, version)
        requests = int(gn.sum())
        waited = gw >= 0
        stats.queue_count += requests
        stats.queue_ns += int(gq.sum()) + int(gw[waited].sum())
        stats.input_count += requests
        stats.input_ns += int((gi * gn).sum())
        stats.infer_count += requests
        stats.infer_ns += int((gc * gn).sum())
        stats.output_count += requests
        stats.output_ns += int((go * gn).sum())
        stats.inference_count += int(ginf.sum())
        stats.execution_count += len(gn)
        end_ms = int(wall_ms - (now - float(end.max())) * 1000)
        if end_ms > stats.last_inference:
            stats.last_inference = end_ms
        for size in np.unique(ginf).tolist():
            same = ginf == size
            entry = stats.batch.get(size)
            if entry is None:
                entry = stats.batch[size] = [0, 0, 0, 0]
            entry[0] += int(same.sum())
            entry[1] += int(gi[same].sum())
            entry[2] += int(gc[same].sum())
            entry[3] += int(go[same].sum())
        _observe_array(stats, "queue", gq // gn, gn)
        _observe_array(stats, "compute_input", gi, gn)
        _observe_array(stats, "compute", gc, gn)
        _observe_array(stats, "output", go, gn)
        if waited.any():
            wn = gn[waited]
            _observe_array(stats, "batch_wait", gw[waited] // wn, wn)

    def execution(
        self,
        model: str,
        version: str,
        requests: int,
        inferences: int,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        end_ms: int,
        batch_wait_ns: int = -1,
    ) -> None:
        """One execution of ``requests`` requests (``inferences``: their batch sizes
        summed) ran: ``queue_ns`` and ``batch_wait_ns`` (-1: it was not formed by the
        host's batcher) all its requests' times together, the other durations the
        batch's own (each request is counted the batch's time, as Triton). Triton's
        queue duration is both waits."""
        stats = self.get(model, version)
        stats.queue_count += requests
        stats.queue_ns += queue_ns + max(0, batch_wait_ns)
        stats.input_count += requests
        stats.input_ns += input_ns * requests
        stats.infer_count += requests
        stats.infer_ns += infer_ns * requests
        stats.output_count += requests
        stats.output_ns += output_ns * requests
        stats.inference_count += inferences
        stats.execution_count += 1
        if end_ms > stats.last_inference:
            stats.last_inference = end_ms
        entry = stats.batch.get(inferences)
        if entry is None:
            entry = stats.batch[inferences] = [0, 0, 0, 0]
        entry[0] += 1
        entry[1] += input_ns
        entry[2] += infer_ns
        entry[3] += output_ns
        stages = stats.stages
        if "queue" not in stages:  # observe(), inlined: this runs once per execution
            for stage in _HOST_STAGES:
                stages[stage] = [0] * _SLOTS
        each = queue_ns // requests
        buckets = stages["queue"]
        buckets[bisect_left(BOUNDS_NS, each)] += requests
        buckets[-1] += each * requests
        buckets = stages["compute_input"]
        buckets[bisect_left(BOUNDS_NS, input_ns)] += requests
        buckets[-1] += input_ns * requests
        buckets = stages["compute"]
        buckets[bisect_left(BOUNDS_NS, infer_ns)] += requests
        buckets[-1] += infer_ns * requests
        buckets = stages["output"]
        buckets[bisect_left(BOUNDS_NS, output_ns)] += requests
        buckets[-1] += output_ns * requests
        if batch_wait_ns >= 0:
            observe(stats, "batch_wait", batch_wait_ns // requests, requests)
