#!/usr/bin/env python3
"""Despina's load generator: KServe v2 load for one model, closed loop or at a fixed rate.

    python loadtest/perf.py --url http://127.0.0.1:8000 --model add_sub -c 8 -d 10 \
        --protocol http-json|http-binary|http-shm|grpc|grpc-stream [--warmup 2] [--sweep 1,8,32] \
        [--rate 1000,2000] [--json-out FILE] [--csv-out FILE] [--plot FILE.png]

It learns the model's inputs from ``GET /v2/models/{model}`` and ``/config`` (gRPC:
ModelMetadata/ModelConfig), builds one request with random data (JSON, Triton's binary
tensor extension, client system shared memory regions, or a ModelInferRequest),
serializes it once, and keeps ``-c`` keep-alive connections each with one request in
flight (or sends ``--rate`` requests/s over them) for a warm-up and then a measurement
window. Each run prints one line: infer/s, latency percentiles, errors and the client's
own CPU time, so a run that starved the server of CPU is visible.

The client must cost far less CPU than the server it measures on a 2-core machine, so the
HTTP hot path is a bare ``asyncio.Protocol`` per connection (no coroutine, future or await
per request): the request bytes are prebuilt, a response is parsed only as far as its
status code and Content-Length, and latencies go into a preallocated ``array('q')``.
``--processes`` splits the connections over forked workers; ``--engine wrk`` drives the
``wrk`` binary instead, when it is installed. gRPC is driven by ``h2load`` or, as a
fallback and for ``--rate``, by grpc.aio (``grpc_engine.py``).

HTTP needs only the standard library and numpy (uvloop and orjson are used when present),
so it runs against Triton or Despina from any environment; gRPC also needs grpcio and
tritonclient[grpc]; ``--plot`` needs matplotlib (the ``loadtest`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from array import array
from collections import deque
from dataclasses import dataclass
from time import perf_counter_ns
from urllib.parse import urlsplit

import numpy as np

try:
    import orjson
except ImportError:  # pragma: no cover - optional speed-up
    orjson = None  # type: ignore[assignment]

try:
    import uvloop
except ImportError:  # pragma: no cover - optional speed-up
    uvloop = None  # type: ignore[assignment]

PROTOCOLS = ("http-json", "http-binary", "http-shm", "grpc", "grpc-stream")
PERCENTILES = (50, 90, 95, 99)

# Triton type -> numpy dtype used to generate data. BF16 travels as raw uint16 bits.
_NUMPY_TYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BF16": np.uint16,
}


class LoadTestError(Exception):
    """A setup or protocol failure that ends the run; the message is for the user."""


# ---------------------------------------------------------------------------------------
# Setup: model metadata, input shapes, request bytes (run once, off the hot path)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    base_path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http":
            raise LoadTestError(f"only http:// URLs are supported, got {url!r}")
        return cls(parts.hostname or "127.0.0.1", parts.port or 80, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.host_header}{self.base_path}{path}"


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


def fetch_json(target: Target, path: str, timeout: float = 10.0) -> dict:
    """GET a JSON document; raises LoadTestError with the server's body on failure."""
    try:
        with urllib.request.urlopen(target.url(path), timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")[:500]
        raise LoadTestError(f"GET {path}: HTTP {exc.code}: {body}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise LoadTestError(f"GET {target.url(path)}: {exc}") from None


def parse_shape_overrides(values: list[str]) -> tuple[dict[str, list[int]], int | None]:
    """``NAME:d1,d2`` (shape without the batch dimension, as perf_analyzer's --shape) or a
    bare ``N`` that replaces every variable (-1) dimension."""
    per_input: dict[str, list[int]] = {}
    default: int | None = None
    for value in values:
        name, sep, dims = value.rpartition(":")
        try:
            parsed = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            raise LoadTestError(f"bad --shape-override {value!r}") from None
        if any(d < 0 for d in parsed):
            raise LoadTestError(f"bad --shape-override {value!r}: negative dimension")
        if sep:
            per_input[name] = parsed
        elif len(parsed) == 1:
            default = parsed[0]
        else:
            raise LoadTestError(f"bad --shape-override {value!r}: use NAME:d1,d2 or N")
    return per_input, default


def resolve_inputs(
    metadata: dict,
    config: dict,
    overrides: dict[str, list[int]],
    default_dim: int | None,
    batch_size: int,
) -> list[InputSpec]:
    """Concrete input shapes. With ``max_batch_size > 0`` the metadata shape starts with the
    batch dimension (Triton reports it as -1); it becomes ``batch_size``, and the other -1
    dimensions become the override or 1. Config dims, when present, win over metadata."""
    max_batch = int(config.get("max_batch_size", 0) or 0)
    config_dims = {
        i["name"]: [int(d) for d in i.get("dims", [])]
        for i in config.get("input", [])
        if "name" in i and "dims" in i
    }
    specs = []
    for meta in metadata.get("inputs", []):
        name, datatype = meta["name"], meta["datatype"]
        if datatype != "BYTES" and datatype not in _NUMPY_TYPES:
            raise LoadTestError(f"input {name}: unsupported datatype {datatype}")
        if name in overrides:
            dims = list(overrides[name])
        elif name in config_dims:
            dims = config_dims[name]
        else:
            dims = [int(d) for d in meta["shape"]]
            if max_batch > 0 and dims:
                dims = dims[1:]
        dims = [d if d >= 0 else (default_dim if default_dim is not None else 1) for d in dims]
        shape = [batch_size, *dims] if max_batch > 0 else dims
        specs.append(InputSpec(name, datatype, tuple(shape)))
    if not specs:
        raise LoadTestError("model metadata lists no inputs")
    return specs


def random_tensor(rng: np.random.Generator, spec: InputSpec) -> np.ndarray:
    """Random data for one input: small non-negative integers (no overflow in add/sub
    style models), floats in [0, 1), random booleans, 8-character ASCII strings."""
    count = math.prod(spec.shape)
    if spec.datatype == "BYTES":
        letters = rng.integers(97, 123, size=(count, 8), dtype=np.uint8)
        return np.array([row.tobytes() for row in letters], dtype=np.object_).reshape(spec.shape)
    if spec.datatype == "BOOL":
        return rng.random(count).reshape(spec.shape) < 0.5
    if spec.datatype == "BF16":
        bits = rng.random(count, dtype=np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).reshape(spec.shape)
    dtype = np.dtype(_NUMPY_TYPES[spec.datatype])
    if dtype.kind == "f":
        return rng.random(count).astype(dtype).reshape(spec.shape)
    return rng.integers(0, 100, size=count).astype(dtype).reshape(spec.shape)


def _json_data(spec: InputSpec, array_: np.ndarray) -> list:
    flat = array_.ravel()
    if spec.datatype == "BYTES":
        return [b.decode() for b in flat]
    if spec.datatype == "BF16":
        return (flat.astype(np.uint32) << 16).view(np.float32).tolist()
    return flat.tolist()


def _raw_bytes(spec: InputSpec, array_: np.ndarray) -> bytes:
    if spec.datatype == "BYTES":
        return b"".join(len(b).to_bytes(4, "little") + b for b in array_.ravel())
    return np.ascontiguousarray(array_).tobytes()


def _dumps(obj: object) -> bytes:
    if orjson is not None:
        return orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":")).encode()


def build_body(
    protocol: str, inputs: list[InputSpec], output_names: list[str], seed: int
) -> tuple[bytes, dict[str, str]]:
    """The infer request body and its content headers, built once per run."""
    rng = np.random.default_rng(seed)
    tensors = [(spec, random_tensor(rng, spec)) for spec in inputs]
    if protocol == "http-json":
        doc = {
            "inputs": [
                {
                    "name": s.name,
                    "shape": list(s.shape),
                    "datatype": s.datatype,
                    "data": _json_data(s, a),
                }
                for s, a in tensors
            ]
        }
        return _dumps(doc), {"Content-Type": "application/json"}
    raws = [_raw_bytes(s, a) for s, a in tensors]
    header_doc: dict[str, list[dict[str, object]]] = {
        "inputs": [
            {
                "name": s.name,
                "shape": list(s.shape),
                "datatype": s.datatype,
                "parameters": {"binary_data_size": len(raw)},
            }
            for (s, _), raw in zip(tensors, raws, strict=True)
        ],
        "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in output_names],
    }
    header = _dumps(header_doc)
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + b"".join(raws), headers


def infer_path(target: Target, model: str, version: str) -> str:
    suffix = f"/versions/{version}" if version else ""
    return f"{target.base_path}/v2/models/{model}{suffix}/infer"


def build_request(target: Target, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The whole HTTP/1.1 request, sent verbatim by every connection."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {target.host_header}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def content_length(data: bytes | bytearray, head_end: int) -> int:
    """Content-Length of a response whose header block ends at ``head_end`` (the index of
    ``\\r\\n\\r\\n``); -1 when absent (chunked responses are not supported)."""
    i = data.find(b"\r\nContent-Length:", 0, head_end)
    if i < 0:
        i = bytes(data[:head_end]).lower().find(b"\r\ncontent-length:")
        if i < 0:
            return -1
    j = data.find(b"\r\n", i + 17, head_end + 2)
    return int(data[i + 17 : j])


def _describe_error(data: bytes | bytearray, need: int) -> str:
    """Status line and body of a complete error response, for the report."""
    response = bytes(data[:need])
    status = response[: response.find(b"\r\n")]
    body = response[response.find(b"\r\n\r\n") + 4 :]
    return (status + b": " + body[:1000]).decode(errors="replace")


def preflight(target: Target, request: bytes, timeout: float = 30.0) -> int:
    """Send the exact request bytes once; raises LoadTestError unless the answer is 200.
    Returns the response body size."""
    with socket.create_connection((target.host, target.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        need = -1
        while need < 0 or len(data) < need:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise LoadTestError("preflight: server closed the connection")
            data += chunk
            end = data.find(b"\r\n\r\n")
            if need < 0 and end >= 0:
                length = content_length(data, end)
                if length < 0:
                    raise LoadTestError("preflight: response has no Content-Length")
                need = end + 4 + length
    if not data.startswith(b"200", 9):
        raise LoadTestError(f"preflight: {_describe_error(data, need)}")
    return need - end - 4


# ---------------------------------------------------------------------------------------
# The Python engine: one event loop per worker process, one Protocol per connection
# ---------------------------------------------------------------------------------------


class _Worker:
    """One process's connections and measurements. Owns the latency array; lives on one
    event loop and is not thread-safe."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target: Target, request: bytes) -> None:
        self.loop = loop
        self.target = target
        self.request = request
        self.lat = array("q", bytes(8 * (1 << 17)))
        self.n = 0
        self.recording = False
        self.started = False
        self.stopped = False
        self.errors = 0
        self.warmup_errors = 0
        self.first_error: str | None = None
        self.fatal: asyncio.Future[str] = loop.create_future()
        self.conns: list[_Connection] = []
        self._tasks: set[asyncio.Task[None]] = set()  # the loop holds tasks only weakly
        # Open loop (--rate): requests are due on a fixed schedule; each goes out on an
        # idle connection, or waits in the backlog for one. Its latency counts from the
        # time it was due, so a slow server cannot hide its queueing (no coordinated
        # omission).
        self.rate = 0.0
        self.sched_start = 0
        self.scheduled = 0
        self.idle: list[_Connection] = []
        self.backlog: deque[int] = deque()

    def grow(self) -> None:
        self.lat.extend(array("q", bytes(8 * len(self.lat))))

    def note_error(self, message: str) -> None:
        if self.stopped:
            return
        if self.recording:
            self.errors += 1
        else:
            self.warmup_errors += 1
        if self.first_error is None:
            self.first_error = message

    def fail(self, message: str) -> None:
        self.stopped = True
        if not self.fatal.done():
            self.fatal.set_result(message)

    async def connect(self) -> _Connection:
        _, conn = await self.loop.create_connection(
            lambda: _Connection(self), self.target.host, self.target.port
        )
        self.conns.append(conn)
        return conn

    def replace(self, lost: _Connection) -> None:
        """Swap a lost connection for a new one (retrying every 100 ms until stopped)."""
        self.conns.remove(lost)
        task = self.loop.create_task(self._reconnect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconnect(self) -> None:
        while not self.stopped:
            try:
                conn = await self.connect()
            except OSError as exc:
                self.note_error(f"connect: {exc}")
                await asyncio.sleep(0.1)
                continue
            if self.started and not self.stopped:
                if self.rate:
                    self.ready(conn)
                else:
                    conn.send()
            return

    def ready(self, conn: _Connection) -> None:
        """Open loop: ``conn`` is free; give it the oldest due request, or park it."""
        if self.backlog:
            conn._t0 = self.backlog.popleft()
            conn._transport.write(self.request)  # type: ignore[union-attr]
        else:
            self.idle.append(conn)

    def tick(self) -> None:
        """Open loop: send every request that is due, then sleep until the next one (at
        least 1 ms: uvloop's timers have millisecond resolution, and a shorter sleep spins).
        A request sent from here counts from its send time, since how late the timer
        fired is the client's doing; one that waited in the backlog for a free connection
        counts from the time it was due, since that wait is the server's doing."""
        if self.stopped:
            return
        rate, start = self.rate, self.sched_start
        now = perf_counter_ns()
        due = int((now - start) * rate / 1e9) + 1
        while self.scheduled < due:
            t = start + int(self.scheduled * 1e9 / rate)
            self.scheduled += 1
            if self.idle:
                conn = self.idle.pop()
                conn._t0 = now
                conn._transport.write(self.request)  # type: ignore[union-attr]
            else:
                self.backlog.append(t)
        next_t = start + int(self.scheduled * 1e9 / rate)
        self.loop.call_later(max(0.001, (next_t - perf_counter_ns()) / 1e9), self.tick)

    async def wait(self, until_ns: int) -> None:
        """Sleep until ``until_ns`` (perf_counter clock) or a fatal error."""
        delay = (until_ns - perf_counter_ns()) / 1e9
        if delay > 0 and not self.fatal.done():
            await asyncio.wait({self.fatal}, timeout=delay)


class _Connection(asyncio.Protocol):
    """A keep-alive connection with one request in flight. The whole request cycle runs
    in ``data_received``: parse status and Content-Length, record, write the next."""

    __slots__ = ("_w", "_transport", "_t0", "_buf", "_need", "_ok")

    def __init__(self, worker: _Worker) -> None:
        self._w = worker
        self._transport: asyncio.Transport | None = None
        self._t0 = 0
        self._buf: bytearray | None = None
        self._need = -1
        self._ok = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self) -> None:
        self._t0 = perf_counter_ns()
        self._transport.write(self._w.request)  # type: ignore[union-attr]

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf is not None:
            buf += data
            data = buf  # type: ignore[assignment]
        need = self._need
        if need < 0:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if buf is None:
                    self._buf = bytearray(data)
                return
            length = content_length(data, end)
            if length < 0:
                self._w.fail("response without Content-Length (chunked is not supported)")
                return
            need = end + 4 + length
            self._ok = data.startswith(b"200", 9)
        if len(data) < need:
            if buf is None:
                self._buf = bytearray(data)
            self._need = need
            return
        now = perf_counter_ns()
        self._buf = None
        self._need = -1
        w = self._w
        if self._ok:
            if w.recording:
                i = w.n
                if i == len(w.lat):
                    w.grow()
                w.lat[i] = now - self._t0
                w.n = i + 1
        else:
            w.note_error(_describe_error(data, need))
        if not w.stopped:
            if w.rate:
                w.ready(self)
            else:
                self._t0 = now
                self._transport.write(w.request)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        w = self._w
        if w.stopped:
            return
        if self in w.idle:
            w.idle.remove(self)
        w.note_error(f"connection lost: {exc or 'closed by server'}")
        w.replace(self)


async def _drive(
    pipe, target: Target, request: bytes, nconn: int, rate: float, warmup_ns: int, dur_ns: int
):
    """Connect, wait for the parent's start time, run warm-up and window, return results."""
    loop = asyncio.get_running_loop()
    w = _Worker(loop, target, request)
    w.rate = rate
    try:
        for _ in range(nconn):
            await w.connect()
    except OSError as exc:
        return {"fatal": f"connect to {target.host_header}: {exc}"}
    pipe.send({"ready": True})
    start_ns = pipe.recv()  # blocking is fine: nothing else runs on this loop yet
    await w.wait(start_ns)
    w.started = True
    if rate:
        w.sched_start = start_ns
        w.idle = list(w.conns)
        w.tick()
    else:
        for conn in list(w.conns):
            conn.send()
    await w.wait(start_ns + warmup_ns)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = perf_counter_ns()
    w.recording = True
    await w.wait(start_ns + warmup_ns + dur_ns)
    w.recording = False
    w.stopped = True
    t1 = perf_counter_ns()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    for conn in list(w.conns):
        conn.close()
    if w.fatal.done():
        return {"fatal": w.fatal.result()}
    return {
        "latencies": w.lat[: w.n].tobytes(),
        "window_ns": t1 - t0,
        "errors": w.errors,
        "warmup_errors": w.warmup_errors,
        "first_error": w.first_error,
        "cpu_user_s": usage1.ru_utime - usage0.ru_utime,
        "cpu_sys_s": usage1.ru_stime - usage0.ru_stime,
        "unsent": len(w.backlog),
    }


def _worker_main(
    pipe, target: Target, request: bytes, nconn: int, rate: float, warmup_ns: int, dur_ns: int
):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    coro = _drive(pipe, target, request, nconn, rate, warmup_ns, dur_ns)
    try:
        if uvloop is not None:
            result = uvloop.run(coro)
        else:
            result = asyncio.run(coro)
    except Exception as exc:  # reported to the parent, which ends the run
        result = {"fatal": f"worker: {type(exc).__name__}: {exc}"}
    pipe.send(result)
    pipe.close()


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_python(
    target: Target,
    request: bytes,
    concurrency: int,
    processes: int,
    warmup_s: float,
    duration_s: float,
    server_pids: list[int],
    rate: float = 0.0,
) -> dict:
    """One run over forked worker processes; returns the merged result. ``rate`` > 0 is
    the open-loop mode: ``rate`` requests/s in all, over ``concurrency`` connections."""
    ctx = mp.get_context("fork")
    warmup_ns, dur_ns = int(warmup_s * 1e9), int(duration_s * 1e9)
    workers = []
    finished = False
    parts = min(processes, concurrency)
    for share in _split(concurrency, parts):
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(
            target=_worker_main,
            args=(child_end, target, request, share, rate / parts, warmup_ns, dur_ns),
            daemon=True,
        )
        proc.start()
        child_end.close()
        workers.append((proc, parent_end))
    try:
        for _, pipe in workers:
            msg = _recv(pipe, 60.0)
            if "fatal" in msg:
                raise LoadTestError(msg["fatal"])
        start_ns = perf_counter_ns() + 20_000_000
        for _, pipe in workers:
            pipe.send(start_ns)
        _sleep_until(start_ns + warmup_ns)
        server0 = cpu_seconds_of(server_pids)
        _sleep_until(start_ns + warmup_ns + dur_ns)
        server1 = cpu_seconds_of(server_pids)
        results = [_recv(pipe, 60.0) for _, pipe in workers]
        finished = True
    finally:
        for proc, pipe in workers:
            pipe.close()
            proc.join(timeout=5 if finished else 0)
            if proc.is_alive():
                proc.terminate()
    for res in results:
        if "fatal" in res:
            raise LoadTestError(res["fatal"])
    latencies = np.concatenate([np.frombuffer(r["latencies"], dtype=np.int64) for r in results])
    first_errors = [r["first_error"] for r in results if r["first_error"]]
    return {
        "requests": int(latencies.size),
        "window_s": sum(r["window_ns"] for r in results) / len(results) / 1e9,
        "infer_per_s": sum(len(r["latencies"]) / 8 / (r["window_ns"] / 1e9) for r in results),
        "latency_ns": latencies,
        "errors": sum(r["errors"] for r in results),
        "warmup_errors": sum(r["warmup_errors"] for r in results),
        "first_error": first_errors[0] if first_errors else None,
        "client_cpu_user_s": sum(r["cpu_user_s"] for r in results),
        "client_cpu_sys_s": sum(r["cpu_sys_s"] for r in results),
        "server_cpu_s": (server1 - server0) if server_pids else None,
        "unsent": sum(r["unsent"] for r in results),
    }


def _recv(pipe, timeout: float):
    if not pipe.poll(timeout):
        raise LoadTestError("a worker process did not answer in time")
    try:
        return pipe.recv()
    except EOFError:
        raise LoadTestError("a worker process died") from None


def _sleep_until(deadline_ns: int) -> None:
    delay = (deadline_ns - perf_counter_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def cpu_seconds_of(pids: list[int]) -> float:
    """User+system CPU seconds of the given processes and all their descendants, read from
    /proc (Linux only). Processes that vanished count as zero."""
    if not pids:
        return 0.0
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    wanted = set(pids)
    grew = True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in wanted and pid not in wanted}
        wanted |= more
        grew = bool(more)
    return sum(ticks.get(pid, 0) for pid in wanted) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------
# The wrk engine (optional): same request, wrk's C event loop, results from a Lua hook
# ---------------------------------------------------------------------------------------

_WRK_LUA = """\
local f = assert(io.open([[{body_path}]], "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("DESPINA_WRK %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.1f %.1f %.1f %.1f\\n",
    summary.duration, summary.requests, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99)))
end
"""


def run_wrk(
    target: Target,
    path: str,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    threads: int,
    warmup_s: float,
    duration_s: float,
    server_pids: list[int],
) -> dict:
    """One run with wrk (whole seconds only). Latency percentiles come from wrk's own
    histogram; errors are connect/read/write/timeout errors plus statuses above 399."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise LoadTestError("--engine wrk: the wrk binary is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="despina-wrk-") as tmp:
        body_path = os.path.join(tmp, "body.bin")
        with open(body_path, "wb") as f:
            f.write(body)
        script = os.path.join(tmp, "post.lua")
        header_lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
        with open(script, "w") as f:
            f.write(_WRK_LUA.format(body_path=body_path, headers=header_lines))
        url = f"http://{target.host_header}{path}"
        base = [wrk, "-t", str(min(threads, concurrency)), "-c", str(concurrency)]
        base += ["--timeout", "10s", "-s", script]
        if warmup_s > 0:
            subprocess.run(
                [*base, "-d", f"{max(1, round(warmup_s))}s", url], capture_output=True, check=True
            )
        server0 = cpu_seconds_of(server_pids)
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(
            [*base, "-d", f"{max(1, round(duration_s))}s", url], capture_output=True, text=True
        )
        usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        server1 = cpu_seconds_of(server_pids)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("DESPINA_WRK ")), None)
    if proc.returncode != 0 or line is None:
        raise LoadTestError(f"wrk failed (rc {proc.returncode}): {proc.stderr or proc.stdout}")
    v = [float(x) for x in line.split()[1:]]
    duration_us, requests, status_errors = v[0], v[1], v[5]
    ok = requests - status_errors
    return {
        "requests": int(ok),
        "window_s": duration_us / 1e6,
        "infer_per_s": ok / (duration_us / 1e6),
        "latency_ns": None,
        "percentiles_ms": dict(zip(PERCENTILES, (x / 1000 for x in v[7:11]), strict=True)),
        "errors": int(sum(v[2:7])),
        "warmup_errors": None,
        "first_error": None,
        "client_cpu_user_s": usage1.ru_utime - usage0.ru_utime,
        "client_cpu_sys_s": usage1.ru_stime - usage0.ru_stime,
        "server_cpu_s": (server1 - server0) if server_pids else None,
    }


# ---------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------
# System shared memory (--protocol http-shm): inputs and outputs in registered regions
# ---------------------------------------------------------------------------------------


def http_call(
    target: Target, method: str, path: str, body: bytes | None = None, headers=None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        target.url(path), data=body, method=method, headers=dict(headers or {})
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise LoadTestError(f"{method} {target.url(path)}: {exc}") from None


class ShmRegions:
    """One input region holding every input's bytes and one output region sized from a
    binary preflight, both in /dev/shm and registered with the server; ``close()``
    unregisters and unlinks them."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.names: list[str] = []

    def supported(self) -> bool:
        status, _, _ = http_call(self.target, "GET", "/v2/systemsharedmemory/status")
        return status == 200

    def create(self, suffix: str, data: bytes | int) -> str:
        name = f"perf_{os.getpid()}_{suffix}"
        size = data if isinstance(data, int) else len(data)
        fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, max(size, 1))
            if not isinstance(data, int):
                os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        self.names.append(name)
        doc = {"key": f"/{name}", "offset": 0, "byte_size": size}
        status, _, body = http_call(
            self.target,
            "POST",
            f"/v2/systemsharedmemory/region/{name}/register",
            _dumps(doc),
            {"Content-Type": "application/json"},
        )
        if status != 200:
            raise LoadTestError(f"register shared memory {name}: HTTP {status}: {body[:300]!r}")
        return name

    def close(self) -> None:
        for name in self.names:
            with contextlib.suppress(LoadTestError):
                http_call(self.target, "POST", f"/v2/systemsharedmemory/region/{name}/unregister")
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{name}")
        self.names = []


def build_shm_body(
    target: Target,
    path: str,
    regions: ShmRegions,
    inputs: list[InputSpec],
    output_names: list[str],
    seed: int,
) -> tuple[bytes, dict[str, str]]:
    """A JSON request whose inputs and outputs all live in shared memory."""
    if not regions.supported():
        raise LoadTestError("the server has no system shared memory (/v2/systemsharedmemory)")
    binary, headers = build_body("http-binary", inputs, output_names, seed)
    status, rheaders, rbody = http_call(target, "POST", path, binary, headers)
    if status != 200:
        raise LoadTestError(f"binary preflight: HTTP {status}: {rbody[:300]!r}")
    hlen = {k.lower(): v for k, v in rheaders.items()}.get("inference-header-content-length")
    header = json.loads(rbody[: int(hlen)] if hlen else rbody)
    out_sizes = []
    for out in header.get("outputs", []):
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            raise LoadTestError(f"output {out.get('name')}: no binary_data_size in the reply")
        out_sizes.append((out["name"], int(size)))
    rng = np.random.default_rng(seed)
    raws = [_raw_bytes(s, random_tensor(rng, s)) for s in inputs]
    in_region = regions.create("in", b"".join(raws))
    out_region = regions.create("out", sum(size for _, size in out_sizes))
    doc_inputs, offset = [], 0
    for spec, raw in zip(inputs, raws, strict=True):
        doc_inputs.append(
            {
                "name": spec.name,
                "shape": list(spec.shape),
                "datatype": spec.datatype,
                "parameters": {
                    "shared_memory_region": in_region,
                    "shared_memory_offset": offset,
                    "shared_memory_byte_size": len(raw),
                },
            }
        )
        offset += len(raw)
    doc_outputs, offset = [], 0
    for name, size in out_sizes:
        doc_outputs.append(
            {
                "name": name,
                "parameters": {
                    "shared_memory_region": out_region,
                    "shared_memory_offset": offset,
                    "shared_memory_byte_size": size,
                },
            }
        )
        offset += size
    body = _dumps({"inputs": doc_inputs, "outputs": doc_outputs})
    return body, {"Content-Type": "application/json"}


# ---------------------------------------------------------------------------------------
# Reporting and the command line
# ---------------------------------------------------------------------------------------

CSV_FIELDS = (
    "label",
    "model",
    "protocol",
    "engine",
    "mode",
    "concurrency",
    "target_rate",
    "processes",
    "window_s",
    "requests",
    "infer_per_s",
    "mb_per_s",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "mean_ms",
    "errors",
    "warmup_errors",
    "unsent",
    "client_cpu_s",
    "client_cpu_us_per_infer",
    "server_cpu_s",
)


def summarize(
    raw: dict,
    protocol: str,
    engine: str,
    concurrency: int,
    processes: int,
    rate: float = 0.0,
    request_tensor_bytes: int = 0,
) -> dict:
    """A flat result record: what the printed line shows, plus a few extras."""
    if raw["latency_ns"] is not None:
        lat = np.sort(raw["latency_ns"])
        pct = {
            p: (float(lat[max(0, math.ceil(p / 100 * lat.size) - 1)]) / 1e6 if lat.size else None)
            for p in PERCENTILES
        }
        mean = float(lat.mean()) / 1e6 if lat.size else None
    else:
        pct, mean = raw["percentiles_ms"], None
    requests = raw["requests"]
    cpu = raw["client_cpu_user_s"] + raw["client_cpu_sys_s"]
    record = {
        "protocol": protocol,
        "engine": engine,
        "mode": "rate" if rate else "closed",
        "concurrency": concurrency,
        "target_rate": rate or None,
        "processes": processes,
        "window_s": round(raw["window_s"], 3),
        "requests": requests,
        "infer_per_s": round(raw["infer_per_s"], 1),
        # input tensor bytes per second, counted once (MB = 10^6 bytes)
        "mb_per_s": round(raw["infer_per_s"] * request_tensor_bytes / 1e6, 1),
        **{f"p{p}_ms": (round(v, 3) if v is not None else None) for p, v in pct.items()},
        "mean_ms": round(mean, 3) if mean is not None else None,
        "errors": raw["errors"],
        "warmup_errors": raw["warmup_errors"],
        "unsent": raw.get("unsent"),
        "client_cpu_s": round(cpu, 3),
        "client_cpu_user_s": round(raw["client_cpu_user_s"], 3),
        "client_cpu_sys_s": round(raw["client_cpu_sys_s"], 3),
        "client_cpu_us_per_infer": round(cpu / requests * 1e6, 1) if requests else None,
        "server_cpu_s": (
            round(raw["server_cpu_s"], 3) if raw["server_cpu_s"] is not None else None
        ),
        "first_error": raw["first_error"],
    }
    return record


def format_line(r: dict) -> str:
    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    level = (
        f"rate={r['target_rate']:g} c={r['concurrency']}"
        if r.get("mode") == "rate"
        else f"c={r['concurrency']}"
    )
    line = (
        f"{r['protocol']} {level} infer/s={r['infer_per_s']:.1f}"
        f" p50={ms(r['p50_ms'])} p90={ms(r['p90_ms'])} p95={ms(r['p95_ms'])}"
        f" p99={ms(r['p99_ms'])} ms errors={r['errors']}"
        f" client_cpu={r['client_cpu_s']:.2f}s"
    )
    if r["client_cpu_us_per_infer"] is not None:
        line += f" ({r['client_cpu_us_per_infer']:.1f}us/infer)"
    if r["server_cpu_s"] is not None:
        line += f" server_cpu={r['server_cpu_s']:.2f}s"
    if r.get("mb_per_s") and r["mb_per_s"] >= 1:
        line += f" MB/s={r['mb_per_s']:.1f}"
    if r.get("unsent"):
        line += f" unsent={r['unsent']}"
    return line


def write_csv(records: list[dict], path: str) -> None:
    """One row per run; the columns are CSV_FIELDS (missing values are empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def plot_latency_throughput(
    series: dict[str, list[dict]], path: str, title: str = "latency vs throughput"
) -> None:
    """A PNG: p50 (solid) and p99 (dashed) latency against achieved infer/s, one colour per
    series (e.g. per server), each point labelled with its concurrency or rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, records) in enumerate(series.items()):
        records = [r for r in records if r.get("p50_ms") is not None]
        if not records:
            continue
        colour = f"C{i}"
        xs = [r["infer_per_s"] for r in records]
        ax.plot(xs, [r["p50_ms"] for r in records], "-o", color=colour, label=f"{label} p50")
        ax.plot(xs, [r["p99_ms"] for r in records], "--^", color=colour, label=f"{label} p99")
        for r, x in zip(records, xs, strict=True):
            tag = f"r{r['target_rate']:g}" if r.get("mode") == "rate" else f"c{r['concurrency']}"
            ax.annotate(
                tag,
                (x, r["p50_ms"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
                color=colour,
            )
    ax.set_xlabel("throughput (infer/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="KServe v2 load generator (HTTP, gRPC, system shared memory) for Despina"
        " and Triton: closed loop (-c/--sweep) or open loop (--rate)."
    )
    p.add_argument(
        "--url",
        default=None,
        help="server base URL (default http://127.0.0.1:8000; 127.0.0.1:8001 for grpc)",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--model-version", default="", help="infer a specific version")
    p.add_argument(
        "-c",
        "--concurrency",
        type=int,
        default=None,
        help="connections in flight (default 1); with --rate, the connection pool (default 64)",
    )
    p.add_argument("--sweep", default="", help="comma list of concurrencies, e.g. 1,8,32")
    p.add_argument(
        "--rate",
        default="",
        help="open loop: requests/s on a fixed schedule; a comma list sweeps rates",
    )
    p.add_argument("-d", "--duration", type=float, default=10.0, help="window seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run")
    p.add_argument("--protocol", choices=PROTOCOLS, default="http-json")
    p.add_argument("--processes", type=int, default=1, help="client processes (python engine)")
    p.add_argument(
        "--engine",
        choices=("auto", "python", "wrk", "h2load"),
        default="auto",
        help="auto: python for HTTP; h2load for grpc when installed (python with --rate)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="batch dim for batching models")
    p.add_argument(
        "--shape-override",
        action="append",
        default=[],
        metavar="NAME:D1,D2|N",
        help="input shape without the batch dim, or N for every -1 dim (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the random input data")
    p.add_argument(
        "--server-pid",
        action="append",
        default=[],
        metavar="PID[,PID]",
        help="also report CPU seconds of these processes and their children",
    )
    p.add_argument("--json-out", help="write the results as JSON to this file")
    p.add_argument("--csv-out", help="write one CSV row per run to this file")
    p.add_argument("--plot", help="write a latency-vs-throughput PNG of the runs to this file")
    p.add_argument("--label", default="", help="series name in the CSV and the plot")
    args = p.parse_args(argv)
    try:
        args.rates = [float(x) for x in args.rate.split(",") if x.strip()]
        if args.rates:
            if args.sweep:
                p.error("--rate and --sweep are exclusive")
            args.levels = [args.concurrency or 64] * len(args.rates)
        else:
            args.levels = (
                [int(x) for x in args.sweep.split(",") if x.strip()]
                if args.sweep
                else [args.concurrency or 1]
            )
            args.rates = [0.0] * len(args.levels)
        args.server_pids = [int(x) for v in args.server_pid for x in v.split(",") if x.strip()]
    except ValueError as exc:
        p.error(str(exc))
    if any(c < 1 for c in args.levels) or args.processes < 1 or args.duration <= 0:
        p.error("concurrency, processes and duration must be positive")
    if any(r < 0 for r in args.rates):
        p.error("--rate must be positive")
    grpc = args.protocol in ("grpc", "grpc-stream")
    if args.protocol == "grpc-stream":
        if args.engine in ("h2load", "wrk"):
            p.error("--protocol grpc-stream is driven by grpc.aio only (--engine python)")
        if any(args.rates):
            p.error("--protocol grpc-stream runs closed loop only: drop --rate")
        args.engine = "python"
    if args.engine == "auto":
        if grpc:
            import grpc_engine

            use_h2load = grpc_engine.h2load_path() is not None and not any(args.rates)
            args.engine = "h2load" if use_h2load else "python"
        else:
            args.engine = "python"
    if args.engine == "h2load" and not grpc:
        p.error("--engine h2load drives --protocol grpc only (wrk drives HTTP)")
    if args.engine == "wrk" and grpc:
        p.error("--engine wrk drives HTTP only (h2load drives grpc)")
    if args.engine in ("wrk", "h2load") and any(args.rates):
        p.error("--rate needs --engine python")
    if args.url is None:
        args.url = "127.0.0.1:8001" if grpc else "http://127.0.0.1:8000"
    return args


def _run_grpc(args: argparse.Namespace) -> tuple[list[dict], dict]:
    import grpc_engine

    try:
        address = grpc_engine.parse_address(args.url)
        metadata, config = grpc_engine.fetch_model(address, args.model, args.model_version)
        overrides, default_dim = parse_shape_overrides(args.shape_override)
        inputs = resolve_inputs(metadata, config, overrides, default_dim, args.batch_size)
        outputs = [o["name"] for o in metadata.get("outputs", [])]
        rng = np.random.default_rng(args.seed)
        raws = [(s, _raw_bytes(s, random_tensor(rng, s))) for s in inputs]
        request = grpc_engine.build_request(args.model, args.model_version, raws, outputs)
        stream = args.protocol == "grpc-stream"
        if stream:
            response_size = grpc_engine.preflight_stream(address, request)
        else:
            response_size = grpc_engine.preflight(address, request)
        tensor_bytes = sum(len(r) for _, r in raws)
        shapes = " ".join(f"{s.name}:{s.datatype}{list(s.shape)}" for s in inputs)
        print(
            f"# {args.model} via grpc://{address}{' streams' if stream else ''}"
            f" engine={args.engine} inputs {shapes}"
            f" request={len(request)}B response={response_size}B",
            file=sys.stderr,
        )
        records = []
        for concurrency, rate in zip(args.levels, args.rates, strict=True):
            if args.engine == "h2load":
                raw = grpc_engine.run_h2load(
                    address,
                    request,
                    concurrency,
                    args.warmup,
                    args.duration,
                    args.server_pids,
                    cpu_seconds_of,
                )
            else:
                raw = grpc_engine.run_aio(
                    address,
                    request,
                    concurrency,
                    args.processes,
                    rate,
                    args.warmup,
                    args.duration,
                    args.server_pids,
                    cpu_seconds_of,
                    _split,
                    stream,
                )
            records.append(_report(raw, args, concurrency, rate, tensor_bytes))
    except grpc_engine.GrpcSetupError as exc:
        raise LoadTestError(str(exc)) from None
    info = {
        "url": f"grpc://{address}",
        "inputs": inputs,
        "request_bytes": len(request),
        "response_bytes": response_size,
    }
    return records, info


def _report(raw: dict, args: argparse.Namespace, concurrency: int, rate: float, nbytes: int):
    processes = 1 if args.engine == "h2load" else min(args.processes, concurrency)
    record = summarize(raw, args.protocol, args.engine, concurrency, processes, rate, nbytes)
    record["label"] = args.label or None
    record["model"] = args.model
    print(format_line(record), flush=True)
    if record["first_error"]:
        print(f"  first error: {record['first_error']}", file=sys.stderr)
    return record


def _run_http(args: argparse.Namespace) -> tuple[list[dict], dict]:
    target = Target.parse(args.url)
    model_path = f"/v2/models/{args.model}"
    if args.model_version:
        model_path += f"/versions/{args.model_version}"
    metadata = fetch_json(target, model_path)
    try:
        config = fetch_json(target, f"{model_path}/config")
    except LoadTestError as exc:
        print(f"warning: no model config ({exc}); assuming max_batch_size 0", file=sys.stderr)
        config = {}
    overrides, default_dim = parse_shape_overrides(args.shape_override)
    inputs = resolve_inputs(metadata, config, overrides, default_dim, args.batch_size)
    outputs = [o["name"] for o in metadata.get("outputs", [])]
    path = infer_path(target, args.model, args.model_version)
    rng = np.random.default_rng(args.seed)
    tensor_bytes = sum(len(_raw_bytes(s, random_tensor(rng, s))) for s in inputs)
    regions = ShmRegions(target)
    try:
        if args.protocol == "http-shm":
            body, headers = build_shm_body(target, path, regions, inputs, outputs, args.seed)
        else:
            body, headers = build_body(args.protocol, inputs, outputs, args.seed)
        request = build_request(target, path, body, headers)
        response_size = preflight(target, request)
        shapes = " ".join(f"{s.name}:{s.datatype}{list(s.shape)}" for s in inputs)
        print(
            f"# {args.model} via {target.url(path[len(target.base_path) :])} {args.protocol}"
            f" engine={args.engine} inputs {shapes} request={len(body)}B"
            f" response={response_size}B",
            file=sys.stderr,
        )
        records = []
        for concurrency, rate in zip(args.levels, args.rates, strict=True):
            if args.engine == "wrk":
                raw = run_wrk(
                    target,
                    path,
                    body,
                    headers,
                    concurrency,
                    args.processes,
                    args.warmup,
                    args.duration,
                    args.server_pids,
                )
            else:
                raw = run_python(
                    target,
                    request,
                    concurrency,
                    args.processes,
                    args.warmup,
                    args.duration,
                    args.server_pids,
                    rate,
                )
            records.append(_report(raw, args, concurrency, rate, tensor_bytes))
    finally:
        regions.close()
    info = {
        "url": args.url,
        "inputs": inputs,
        "request_bytes": len(body),
        "response_bytes": response_size,
    }
    return records, info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.protocol in ("grpc", "grpc-stream"):
            records, info = _run_grpc(args)
        else:
            records, info = _run_http(args)
    except LoadTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json_out:
        doc = {
            "url": info["url"],
            "model": args.model,
            "model_version": args.model_version or None,
            "protocol": args.protocol,
            "inputs": [
                {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                for s in info["inputs"]
            ],
            "request_bytes": info["request_bytes"],
            "response_bytes": info["response_bytes"],
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "runs": records,
        }
        with open(args.json_out, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    if args.csv_out:
        write_csv(records, args.csv_out)
    if args.plot:
        title = f"{args.model} {args.protocol}"
        plot_latency_throughput({args.label or args.url: records}, args.plot, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
