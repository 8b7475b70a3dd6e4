"""The services started one by one over TCP, as compose and Kubernetes run them.

``Topology`` starts a scheduler, any number of backend hosts per framework and any
number of frontends, each its own process, and lets a test add a host, freeze one
(SIGSTOP), thaw it, kill one, or restart the scheduler on the same endpoints. With
``shm=False`` every tensor rides the sockets (the frontends' and hosts' inline
threshold is raised past any test tensor), as between machines that share no
``/dev/shm``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import free_port, http_status

# Past any tensor a test sends: every tensor is inlined in the messages.
NO_SHM_THRESHOLD = str(1 << 30)


@dataclass
class Service:
    role: str  # "scheduler", "frontend", "backend-onnxruntime", ...
    argv: list[str]
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Frontend:
    service: Service
    http: str  # "127.0.0.1:port"
    grpc: str
    reply: str


@dataclass
class Topology:
    """Scheduler, hosts and frontends over loopback TCP; stop() ends every one."""

    tmp_path: Path
    repository: Path
    hosts: dict[str, int] = field(default_factory=lambda: {"onnxruntime": 1})
    frontends: int = 1
    shm: bool = True
    scheduler_flags: list[str] = field(default_factory=list)
    host_flags: list[str] = field(default_factory=list)
    frontend_flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scheduler_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.host_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.log_path = self.tmp_path / "topology.log"
        self._log = open(self.log_path, "ab")
        self.services: list[Service] = []
        self.frontend_list: list[Frontend] = []
        self.scheduler = self._start_scheduler()
        for framework, count in self.hosts.items():
            for _ in range(count):
                self.add_host(framework)
        for _ in range(self.frontends):
            self.add_frontend()

    # --- starting ------------------------------------------------------------------------

    def spawn(self, role: str, argv: list[str]) -> Service:
        env = {**os.environ, **self.env}
        proc = subprocess.Popen(
            [sys.executable, "-m", "despina.services.cli", *argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        service = Service(role, argv, proc)
        self.services.append(service)
        return service

    def _start_scheduler(self) -> Service:
        return self.spawn(
            "scheduler",
            [
                "scheduler",
                f"--model-repository={self.repository}",
                f"--endpoint={self.scheduler_endpoint}",
                f"--host-endpoint={self.host_endpoint}",
                *self.scheduler_flags,
            ],
        )

    def add_host(self, framework: str = "onnxruntime", *flags: str) -> Service:
        argv = ["backend-host", f"--framework={framework}", f"--scheduler={self.host_endpoint}"]
        if not self.shm:
            argv.append(f"--inline-threshold={NO_SHM_THRESHOLD}")
        return self.spawn(f"backend-{framework}", [*argv, *self.host_flags, *flags])

    def add_frontend(self, *flags: str) -> Frontend:
        http_port, grpc_port, reply_port = free_port(), free_port(), free_port()
        reply = f"tcp://127.0.0.1:{reply_port}"
        argv = [
            "frontend",
            f"--scheduler={self.host_endpoint}",
            f"--reply-endpoint={reply}",
            "--http-address=127.0.0.1",
            f"--http-port={http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc_port}",
        ]
        if not self.shm:
            argv.append(f"--inline-threshold={NO_SHM_THRESHOLD}")
        service = self.spawn("frontend", [*argv, *self.frontend_flags, *flags])
        frontend = Frontend(service, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", reply)
        self.frontend_list.append(frontend)
        return frontend

    # --- looking -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The first frontend's HTTP address (tritonclient's ``url``)."""
        return self.frontend_list[0].http

    @property
    def grpc_url(self) -> str:
        return self.frontend_list[0].grpc

    def host_services(self, framework: str = "onnxruntime") -> list[Service]:
        return [s for s in self.services if s.role == f"backend-{framework}" and s.alive()]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0, model: str | None = None) -> None:
        """Every running frontend answers ready (and ``model`` is ready on each), or fail
        with the services' log."""
        deadline = time.monotonic() + timeout
        path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
        pending = [f for f in self.frontend_list if f.service.alive()]  # not those killed
        while pending and time.monotonic() < deadline:
            try:
                if http_status(f"http://{pending[0].http}{path}") == 200:
                    pending.pop(0)
                    continue
            except OSError:
                pass
            time.sleep(0.1)
        if pending:
            pytest.fail(f"not ready after {timeout} s:\n{self.log()[-8000:]}")

    def wait_log(self, needle: str, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``needle`` appears ``count`` times in the services' log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(needle) >= count:
                return
            time.sleep(0.1)
        pytest.fail(f"{needle!r} not logged {count} time(s) in {timeout} s:\n{self.log()[-8000:]}")

    # --- failing -------------------------------------------------------------------------

    def freeze(self, service: Service) -> None:
        """SIGSTOP: the process keeps its sockets open and answers nothing."""
        os.kill(service.pid, signal.SIGSTOP)

    def thaw(self, service: Service) -> None:
        os.kill(service.pid, signal.SIGCONT)

    def kill(self, service: Service) -> None:
        if service.alive():
            service.proc.kill()
            service.proc.wait(10)

    def restart_scheduler(self) -> Service:
        """Kill the scheduler (SIGKILL, as a crash) and start a new one on the same
        endpoints; frontends and hosts are left to reconnect."""
        self.kill(self.scheduler)
        self.scheduler = self._start_scheduler()
        return self.scheduler

    def stop(self) -> None:
        for service in self.services:
            if service.alive():
                try:
                    os.kill(service.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                service.proc.terminate()
        for service in self.services:
            try:
                service.proc.wait(15)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait(5)
        self._log.close()


# --- load ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request a ``Load`` sent: when, and its error (None: it succeeded)."""

    label: str
    start: float
    end: float
    error: BaseException | None

    @property
    def seconds(self) -> float:
        return self.end - self.start


# A worker: its label, and what opens its client: ``send(n)`` sends request number n
# (raising on failure, checking the answer's values), ``close()`` ends the client.
Worker = tuple[str, Callable[[], tuple[Callable[[int], object], Callable[[], None]]]]


class Load:
    """Threads that send requests back to back until stopped (``with Load(...)``), each
    outcome kept: what the scale-out, heartbeat and restart tests hold the server to
    while they add, freeze, kill or restart its services. A request that fails is kept
    with its error and the thread goes on after ``pause_s``; leaving the ``with`` stops
    the threads and fails if one is stuck in a request."""

    def __init__(self, workers: list[Worker], pause_s: float = 0.0, join_s: float = 60.0):
        self.outcomes: list[Outcome] = []
        self._pause_s = pause_s
        self._join_s = join_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i, label, opener), daemon=True)
            for i, (label, opener) in enumerate(workers)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self._join_s)
        assert not any(t.is_alive() for t in self._threads), "a request never ended"

    def _run(self, worker: int, label: str, opener) -> None:
        send, close = opener()
        n = worker * 100_000
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                error: BaseException | None = None
                try:
                    send(n)
                except Exception as exc:  # noqa: BLE001 - kept, judged by the test
                    error = exc
                with self._lock:
                    self.outcomes.append(Outcome(label, start, time.monotonic(), error))
                n += 1
                if error is not None and self._pause_s:
                    time.sleep(self._pause_s)
        finally:
            close()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def errors(self) -> list[BaseException]:
        return [o.error for o in self.snapshot() if o.error is not None]

    def successes(self, since: float = 0.0) -> int:
        return sum(o.error is None and o.start > since for o in self.snapshot())
