"""HTTP load: the Python engine (one event loop per worker process, one bare
``asyncio.Protocol`` per connection, prebuilt request bytes, latencies into a preallocated
``array('q')``), and the optional ``wrk`` engine; CPU seconds of the processes measured."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from array import array
from collections import deque
from time import perf_counter_ns

from despina.services.perf.report import combine_workers
from despina.services.perf.target import (
    PERCENTILES,
    LoadTestError,
    Target,
    content_length,
    describe_error,
)

try:
    import uvloop
except ImportError:  # pragma: no cover - optional speed-up
    uvloop = None  # type: ignore[assignment]


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
            w.note_error(describe_error(data, need))
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


def split_evenly(total: int, parts: int) -> list[int]:
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
    for share in split_evenly(concurrency, parts):
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
    return combine_workers(results, (server1 - server0) if server_pids else None)


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
