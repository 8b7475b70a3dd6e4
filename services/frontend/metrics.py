"""The Prometheus endpoint (``GET /metrics`` on --metrics-port, 8002): Triton's metric
names, types and labels, and Despina's per-stage histograms, in Prometheus' text format
written by ``prometheus_client``.

Each frontend serves the port (shared with ``SO_REUSEPORT``, as 8000 and 8001); a scrape
asks the scheduler for its merged totals (one ``statistics`` query: every frontend and
backend host's counts, services/scheduler/stats.py), so any frontend answers for the
whole server. Machine gauges (CPU from /proc, GPUs through pynvml when it finds one) are
read at a scrape when the last reading is older than --metrics-interval-ms. Off the
request path: nothing here runs per inference.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

from despina.common import control as c
from despina.common import stats
from despina.common.errors import ServerError

if TYPE_CHECKING:
    from despina.services.frontend.scheduler_client import SchedulerClient

log = logging.getLogger("despina.frontend")

DEFAULT_QUANTILES = (0.5, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class MetricsConfig:
    """--metrics-config, Triton's keys: ``summary_latencies`` (the *_summary_us
    summaries), ``summary_quantiles`` ("0.5:0.05,0.9:0.01": quantile:error pairs; the
    error is accepted and unused, quantiles are estimated from the stage histograms),
    ``histogram_latencies`` (Triton's histogram of a decoupled model's time to first
    response, ``nv_inference_first_response_histogram_ms``, on Triton's default
    buckets)."""

    summary_latencies: bool = False
    histogram_latencies: bool = False
    summary_quantiles: tuple[float, ...] = DEFAULT_QUANTILES

    @classmethod
    def parse(cls, values: list[str] | None) -> MetricsConfig:
        """Raises ValueError naming what is wrong."""
        summary = histogram = False
        quantiles: tuple[float, ...] = DEFAULT_QUANTILES
        for value in values or ():
            key, sep, text = value.partition("=")
            if not sep:
                raise ValueError(f"--metrics-config takes <setting>=<value>, got '{value}'")
            key = key.strip()
            if key in ("summary_latencies", "histogram_latencies"):
                on = _switch(text, key)
                summary, histogram = (
                    (on, histogram) if key == "summary_latencies" else (summary, on)
                )
            elif key == "summary_quantiles":
                try:
                    quantiles = tuple(float(pair.split(":")[0]) for pair in text.split(",") if pair)
                except ValueError:
                    raise ValueError(
                        f"summary_quantiles takes <quantile>:<error>,..., got '{text}'"
                    ) from None
                if not quantiles or any(not 0.0 <= q <= 1.0 for q in quantiles):
                    raise ValueError(f"summary_quantiles must be within [0, 1], got '{text}'")
            else:
                raise ValueError(
                    f"unknown --metrics-config setting '{key}' (summary_latencies, "
                    "summary_quantiles, histogram_latencies)"
                )
        return cls(summary, histogram, quantiles)


def _switch(text: str, key: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "on", "yes"):
        return True
    if lowered in ("false", "0", "off", "no"):
        return False
    raise ValueError(f"{key} takes true or false, got '{text}'")


# (Triton's name, help, the ModelStatistics field, scale to µs (None: a count)).
_COUNTERS = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes", "success_count", None),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)", "inference_count", None),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)", "execution_count", None),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds (includes cached requests)", "success_ns", 1000),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds (includes cached requests)", "queue_ns", 1000),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds (does not include cached requests)", "input_ns", 1000),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds (does not include cached requests)", "infer_ns", 1000),
    ("nv_inference_compute_output_duration_us", "Cumulative inference compute output duration in microseconds (does not include cached requests)", "output_ns", 1000),
)  # fmt: skip
# Response cache metrics: always 0, Despina has no response cache yet.
_CACHE = (
    ("nv_cache_num_hits_per_model", "Number of cache hits per model"),
    ("nv_cache_num_misses_per_model", "Number of cache misses per model"),
    ("nv_cache_hit_duration_per_model", "Total cache hit duration per model, in microseconds"),
    ("nv_cache_miss_duration_per_model", "Total cache miss duration per model, in microseconds"),
)
# (Triton's summary, the stage its observations are read from).
_SUMMARIES = (
    ("nv_inference_request_summary_us", "Summary of inference request duration in microseconds (includes cached requests)", "request"),
    ("nv_inference_queue_summary_us", "Summary of inference queuing duration in microseconds (includes cached requests)", "queue"),
    ("nv_inference_compute_input_summary_us", "Summary of compute input duration in microseconds (does not include cached requests)", "compute_input"),
    ("nv_inference_compute_infer_summary_us", "Summary of compute inference duration in microseconds (does not include cached requests)", "compute"),
    ("nv_inference_compute_output_summary_us", "Summary of inference compute output duration in microseconds (does not include cached requests)", "output"),
)  # fmt: skip
STAGE_HISTOGRAM = "despina_stage_duration_us"
FIRST_RESPONSE_HISTOGRAM = stats.FIRST_RESPONSE_HISTOGRAM  # Triton's (histogram_latencies)
COUNTER_NAMES = (
    "nv_inference_request_failure",
    *(name for name, *_ in _COUNTERS),
    *(name for name, _ in _CACHE),
    "nv_energy_consumption",
)


class MachineGauges:
    """CPU utilization and memory from /proc (machine-wide, as Triton), and each GPU's
    through pynvml when it loads and finds one; read at most every ``interval_s``."""

    def __init__(self, interval_s: float, cpu: bool = True, gpu: bool = True) -> None:
        self.interval_s = interval_s
        self.cpu = cpu
        self._read_at = 0.0
        self._cpu_times: tuple[int, int] | None = None
        self.utilization = 0.0
        self.memory_total = 0
        self.memory_used = 0
        self.gpus: list[dict] = []
        self._nvml = _nvml() if gpu else None

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._read_at < self.interval_s and self._read_at:
            return
        self._read_at = now
        if self.cpu:
            self._read_cpu()
        if self._nvml is not None:
            self.gpus = _read_gpus(self._nvml)

    def _read_cpu(self) -> None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/meminfo") as f:
                info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        except (OSError, ValueError, IndexError):
            return
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])
        if self._cpu_times is not None:
            d_total = total - self._cpu_times[1]
            if d_total > 0:
                self.utilization = max(0.0, 1.0 - (idle - self._cpu_times[0]) / d_total)
        self._cpu_times = (idle, total)
        self.memory_total = info.get("MemTotal", 0)
        self.memory_used = self.memory_total - info.get("MemAvailable", info.get("MemFree", 0))


def _nvml() -> object | None:
    """pynvml, initialized, when it is installed and finds a GPU; else None."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        return pynvml
    except Exception:
        return None


def _read_gpus(nvml: object) -> list[dict]:
    gpus = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):  # type: ignore[attr-defined]
            h = nvml.nvmlDeviceGetHandleByIndex(i)  # type: ignore[attr-defined]
            uuid = nvml.nvmlDeviceGetUUID(h)  # type: ignore[attr-defined]
            memory = nvml.nvmlDeviceGetMemoryInfo(h)  # type: ignore[attr-defined]
            gpu = {
                "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
                "utilization": nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,  # type: ignore[attr-defined]
                "memory_total": memory.total,
                "memory_used": memory.used,
            }
            for key, read, scale in (
                ("power_usage", "nvmlDeviceGetPowerUsage", 1000.0),
                ("power_limit", "nvmlDeviceGetEnforcedPowerLimit", 1000.0),
                ("energy", "nvmlDeviceGetTotalEnergyConsumption", 1000.0),
            ):
                try:
                    gpu[key] = getattr(nvml, read)(h) / scale
                except Exception:
                    gpu[key] = 0.0
            gpus.append(gpu)
    except Exception as exc:
        log.debug("reading the GPUs failed: %s", exc)
    return gpus


class StatsCollector:
    """A ``prometheus_client`` collector over one snapshot (``snapshot``, set just
    before each ``generate_latest``) and the machine gauges."""

    def __init__(self, config: MetricsConfig, machine: MachineGauges) -> None:
        self.config = config
        self.machine = machine
        self.snapshot = c.Statistics([])

    def collect(self):  # type: ignore[no-untyped-def]
        models = self.snapshot.models
        labels = [{"model": s.name, "version": s.version} for s in models]
        fail = Metric(
            "nv_inference_request_failure",
            "Number of failed inference requests, all batch sizes",
            "counter",
        )
        for s, lab in zip(models, labels):
            for reason in stats.REASONS:
                count = s.fail.get(reason, (0, 0))[0]
                fail.add_sample("nv_inference_request_failure", {**lab, "reason": reason}, count)
        yield fail
        for name, text, field, scale in _COUNTERS:
            metric = Metric(name, text, "counter")
            for s, lab in zip(models, labels):
                value = getattr(s, field)
                metric.add_sample(name, lab, value / scale if scale else value)
            yield metric
        pending = Metric(
            "nv_inference_pending_request_count",
            "Instantaneous number of pending requests awaiting execution per-model.",
            "gauge",
        )
        for s, lab in zip(models, labels):
            pending.add_sample("nv_inference_pending_request_count", lab, s.pending)
        yield pending
        for name, text in _CACHE:
            metric = Metric(name, text, "counter")
            for lab in labels:
                metric.add_sample(name, lab, 0)
            yield metric
        if self.config.summary_latencies:
            yield from self._summaries(models, labels)
        if self.config.histogram_latencies:
            yield self._first_response(models, labels)
        yield self._stages(models, labels)
        yield from self._machine()

    def _summaries(self, models: list[c.ModelStatistics], labels: list[dict]):  # type: ignore[no-untyped-def]
        for name, text, stage in _SUMMARIES:
            metric = Metric(name, text, "summary")
            for s, lab in zip(models, labels):
                buckets = s.stages.get(stage)
                if buckets is None:
                    buckets = [0] * (len(stats.BOUNDS_NS) + 2)
                for q in self.config.summary_quantiles:
                    metric.add_sample(
                        name, {**lab, "quantile": repr(q)}, stats.quantile(buckets, q)
                    )
                metric.add_sample(name + "_count", lab, sum(buckets[:-1]))
                metric.add_sample(name + "_sum", lab, buckets[-1] / 1000)
            yield metric

    @staticmethod
    def _first_response(models: list[c.ModelStatistics], labels: list[dict]) -> Metric:
        """Triton's: per decoupled model version (from its load: the scheduler gives
        them an empty histogram), requests by the time to their first response, in ms."""
        metric = Metric(
            FIRST_RESPONSE_HISTOGRAM,
            "Duration from request to first response in milliseconds",
            "histogram",
        )
        for s, lab in zip(models, labels):
            if s.first_response and len(s.first_response) == len(s.first_response_le) + 2:
                les = (*(f"{b:g}" for b in s.first_response_le), "+Inf")
                _add_histogram(metric, lab, les, s.first_response, 1e6)
        return metric

    def _stages(self, models: list[c.ModelStatistics], labels: list[dict]) -> Metric:
        """Despina's own: each stage's histogram; its buckets add up across processes."""
        metric = Metric(
            STAGE_HISTOGRAM,
            "Duration of each stage of a request in microseconds: frontend_decode, "
            "frontend_encode, request (the whole) in frontends; batch_wait, queue, "
            "compute_input, compute, output in backend hosts",
            "histogram",
        )
        for s, lab in zip(models, labels):
            for stage in stats.STAGES:
                buckets = s.stages.get(stage)
                if buckets is None:
                    continue
                _add_histogram(metric, {"stage": stage, **lab}, _STAGE_LE, buckets, 1000)
        return metric

    def _machine(self):  # type: ignore[no-untyped-def]
        machine = self.machine
        machine.refresh()
        if machine.cpu:
            for name, text, value in (
                ("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", machine.utilization),
                ("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", machine.memory_total),
                ("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes", machine.memory_used),
            ):  # fmt: skip
                metric = Metric(name, text, "gauge")
                metric.add_sample(name, {}, value)
                yield metric
        if machine.gpus:
            for name, text, key, typ in (
                ("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", "utilization", "gauge"),
                ("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", "memory_total", "gauge"),
                ("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", "memory_used", "gauge"),
                ("nv_gpu_power_usage", "GPU power usage in watts", "power_usage", "gauge"),
                ("nv_gpu_power_limit", "GPU power management limit in watts", "power_limit", "gauge"),
                ("nv_energy_consumption", "GPU energy consumption in joules since the Triton Server started", "energy", "counter"),
            ):  # fmt: skip
                metric = Metric(name, text, typ)
                for gpu in machine.gpus:
                    metric.add_sample(name, {"gpu_uuid": gpu["uuid"]}, gpu[key])
                yield metric


# The ``le`` labels of the stage histograms' buckets, then +Inf, as prometheus_client
# writes floats (the first-response ones are written as Triton writes them: "%g").
_STAGE_LE = (*(f"{float(b)}" for b in stats.BOUNDS_US), "+Inf")


def _add_histogram(
    metric: Metric, labels: dict, les: tuple[str, ...], buckets: list[int], unit_ns: float
) -> None:
    """One histogram series of ``metric``: ``buckets`` (counts per bound, +Inf, then the
    sum in ns, as common/stats.py keeps them) as cumulative ``_bucket`` samples, then
    ``_count`` and ``_sum`` (in units of ``unit_ns`` ns)."""
    name = metric.name
    cumulative = 0
    for le, count in zip(les, buckets[:-1]):
        cumulative += count
        metric.add_sample(name + "_bucket", {**labels, "le": le}, cumulative)
    metric.add_sample(name + "_count", labels, cumulative)
    metric.add_sample(name + "_sum", labels, buckets[-1] / unit_ns)


def exposition(collector: StatsCollector) -> bytes:
    """The text format of ``collector``'s metrics, as Triton writes it: a counter's HELP
    and TYPE lines name it as its samples do (prometheus_client would add ``_total``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    text = generate_latest(registry)
    for name in COUNTER_NAMES:
        for kind in (b"# HELP ", b"# TYPE "):
            text = text.replace(kind + name.encode() + b"_total ", kind + name.encode() + b" ")
    return text


class MetricsServer:
    """``GET /metrics`` on its own port: each scrape one statistics query to the
    scheduler. One request per connection (Connection: close); anything else 404/405."""

    def __init__(self, client: SchedulerClient, collector: StatsCollector) -> None:
        self.client = client
        self.collector = collector
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, reuse_port: bool) -> None:
        """Raises OSError when the port cannot be bound."""
        self._server = await asyncio.start_server(
            self._serve, host, port, reuse_port=reuse_port or None
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if path != b"/metrics":
                status, body, ctype = b"404 Not Found", b"Not Found\n", b"text/plain"
            elif method not in (b"GET", b"HEAD"):
                status, body, ctype = b"405 Method Not Allowed", b"", b"text/plain"
            else:
                status, body, ctype = await self._metrics()
                if method == b"HEAD":
                    body = b""
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n" + body
            )  # fmt: skip
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _metrics(self) -> tuple[bytes, bytes, bytes]:
        try:
            record = await self.client.query("statistics")
        except ServerError as exc:
            return b"503 Service Unavailable", exc.message.encode() + b"\n", b"text/plain"
        collector = self.collector
        collector.snapshot = c.expect(record, c.Statistics)
        return b"200 OK", exposition(collector), CONTENT_TYPE_LATEST.encode()
