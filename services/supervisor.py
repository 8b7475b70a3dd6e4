"""``despina serve``: the embedded default. One command starts the scheduler, the
frontend(s) and one backend host per framework the repository needs, supervises them
(restarting any that dies), and on SIGINT/SIGTERM drains in-flight requests and stops
every child.

The children talk over ``ipc://`` sockets in a private runtime folder; each is the same
program compose runs as a container (``despina scheduler|frontend|backend-host``).

This process only starts, watches and stops the others, so it stays small: no event
loop, no HTTP client (a raw request checks readiness), and protobuf (to read the
repository's configs) is loaded only in a short-lived forked child (``call_forked``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from argparse import ArgumentTypeError
from dataclasses import dataclass, field
from pathlib import Path

from despina.common.errors import ServerError
from despina.common.process import call_forked, die_with_parent
from despina.common.settings import STATISTICS_ENV, SpeedPaths
from despina.common.shm.arena import remove_segments_of
from despina.services.flags import (
    auto_complete,
    grpc_flag_argv,
    http_flag_argv,
    metrics_flag_argv,
    model_control_argv,
)
from despina.services.frontend.restricted import parse as parse_restrictions
from despina.services.identity import describe
from despina.services.observability_flags import log_trace_argv

log = logging.getLogger("despina.serve")

EXIT_CONFIG = 78


@dataclass(eq=False)
class Child:
    name: str
    argv: list[str]
    order: int  # stop order: lower stops first
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    history: list[float] = field(default_factory=list)


def frameworks_needed(repositories: list[Path]) -> list[str]:
    """Frameworks of the models in the repositories; a model whose config is broken is
    skipped here (the scheduler reports it)."""
    from despina.common import model_config

    found: set[str] = set()
    for root in repositories:
        if not root.is_dir():
            continue
        for path in root.iterdir():
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                config = model_config.load(path)
                found.add(model_config.framework_of(config, path))
            except (ServerError, OSError):
                continue
    return sorted(found)


class Supervisor:
    def __init__(self, args, speed: SpeedPaths | None = None) -> None:
        """``args``: the parsed ``serve`` namespace; ``speed``: the speed paths every
        service is started with (default: all on)."""
        self.args = args
        self.speed = speed or SpeedPaths()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="despina-"))
        self.children: list[Child] = []
        self.stopping = False
        self.exit_code = 0
        # Model control (_watch_repository): the frameworks hosts run for, and the
        # repositories' folder names when their configs were last read.
        self._frameworks: set[str] = set()
        self._folders: set[str] = set()
        self._next_look = 0.0

    def plan(self) -> None:
        args = self.args
        if args.allow_metrics:  # every process counts (children inherit the environment)
            os.environ[STATISTICS_ENV] = "on"
        py = [sys.executable, "-m"]
        # The logging and trace flags: every service logs and traces as told from the start.
        verbose = ["--log-verbose", str(args.log_verbose), *log_trace_argv(args)]
        # Passed explicitly, so a frontend and its backend hosts always agree.
        inline = f"--inline-threshold={args.inline_threshold}"
        # Every service gets every path explicit: all agree, whatever their environment.
        speed = self.speed.argv()
        scheduler = f"ipc://{self.runtime_dir}/scheduler"  # ZeroMQ, for frontends that want it
        hosts = f"unix://{self.runtime_dir}/hosts"  # stream, for backend hosts and frontends
        repos: list[str] = []
        for repo in args.model_repository:
            repos += ["--model-repository", str(Path(repo).resolve())]
        self.children.append(
            Child(
                "scheduler",
                py
                + [
                    "despina.services.scheduler",
                    # ZeroMQ only where frontends use it: pyzmq costs ~5 MiB otherwise.
                    f"--endpoint={scheduler if args.scheduler_transport == 'zmq' else ''}",
                    "--host-endpoint",
                    hosts,
                    f"--allow-client-shm={'true' if args.allow_client_shm else 'false'}",
                    f"--state-dir={self.runtime_dir}",  # a restarted scheduler's models
                    *speed,
                    *repos,
                    *model_control_argv(args),
                    *([] if auto_complete(args) else ["--disable-auto-complete-config"]),
                    f"--host-heartbeat-timeout-ms={args.host_heartbeat_timeout_ms}",
                    *verbose,
                ],
                order=2,
            )
        )
        # Reading the configs loads protobuf: in a forked child, not in this process.
        repositories = [Path(p) for p in args.model_repository]
        self._backend_argv = lambda framework: (
            py
            + [
                "despina.services.backend_host",
                "--framework",
                framework,
                "--scheduler",
                hosts,
                inline,
                *speed,
                f"--host-heartbeat-interval-ms={args.host_heartbeat_interval_ms}",
                *verbose,
            ]
        )
        self._folders = _folder_names(args.model_repository)
        for framework in call_forked(frameworks_needed, repositories):
            self._frameworks.add(framework)
            self.children.extend(self._hosts_of(framework))
        if args.allow_http or args.allow_grpc:
            for i in range(args.frontends):
                self.children.append(
                    Child(
                        f"frontend-{i}",
                        py
                        + [
                            "despina.services.frontend",
                            "--scheduler",
                            scheduler if args.scheduler_transport == "zmq" else hosts,
                            "--reply-endpoint",
                            f"unix://{self.runtime_dir}/frontend-{i}",
                            f"--allow-http={'true' if args.allow_http else 'false'}",
                            "--http-address",
                            args.http_address,
                            "--http-port",
                            str(args.http_port),
                            *grpc_flag_argv(args),
                            *http_flag_argv(args),
                            *metrics_flag_argv(args),
                            inline,
                            *speed,
                            "--exit-timeout-secs",
                            str(args.exit_timeout_secs),
                            *(["--reuse-port"] if args.frontends > 1 else []),
                            f"--server-name={args.server_name}",
                            *verbose,
                        ],
                        order=0,
                    )
                )

    def _spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(child.argv, preexec_fn=die_with_parent)
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    def run(self) -> int:
        log.info("%s", describe())
        self.plan()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda _sig, _frame: self._request_stop())
        for child in self.children:
            self._spawn(child)
        threading.Thread(target=self._announce_when_ready, name="announce", daemon=True).start()
        try:
            while not self.stopping:
                time.sleep(0.1)
                self._check_children()
                self._watch_repository()
        finally:
            self._stop_all()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return self.exit_code

    def _watch_repository(self) -> None:
        """Outside model-control mode none, a model added to a repository may need a
        framework no backend host runs: start one. Looks each second; the configs are
        read (in a forked child) only when the repositories' folder names change."""
        if getattr(self.args, "model_control_mode", "none") == "none" or self.stopping:
            return
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + 1.0
        folders = _folder_names(self.args.model_repository)
        if folders == self._folders:
            return
        self._folders = folders
        repositories = [Path(p) for p in self.args.model_repository]
        for framework in call_forked(frameworks_needed, repositories):
            if framework in self._frameworks:
                continue
            self._frameworks.add(framework)
            hosts = self._hosts_of(framework)
            self.children.extend(hosts)
            log.info(
                "a model of framework %s appeared: starting %d backend host(s)",
                framework,
                len(hosts),
            )
            for child in hosts:
                self._spawn(child)

    def _hosts_of(self, framework: str) -> list[Child]:
        """The backend hosts ``framework`` runs on (--backend-hosts; one by default):
        ``backend-<framework>``, then ``backend-<framework>-1``, ..."""
        count = hosts_for(getattr(self.args, "backend_hosts", None), framework)
        return [
            Child(
                f"backend-{framework}" + (f"-{i}" if i else ""),
                self._backend_argv(framework),
                order=1,
            )
            for i in range(count)
        ]

    def _request_stop(self) -> None:
        if not self.stopping:
            log.info(
                "stopping: draining in-flight requests (up to %.0fs)", self.args.exit_timeout_secs
            )
        self.stopping = True

    def _check_children(self) -> None:
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            code = child.proc.returncode
            remove_segments_of(child.proc.pid)  # what a crash left in /dev/shm
            if code == EXIT_CONFIG:
                log.error(
                    "%s cannot start with these settings (see its log above); stopping", child.name
                )
                self.exit_code = 1
                self.stopping = True
                return
            now = time.monotonic()
            child.history = [t for t in child.history if now - t < 30] + [now]
            if len(child.history) > 5:
                log.error(
                    "%s keeps exiting (%d times in 30s); stopping", child.name, len(child.history)
                )
                self.exit_code = 1
                self.stopping = True
                return
            log.error("%s (pid %d) exited with %s; restarting it", child.name, child.proc.pid, code)
            child.restarts += 1
            self._spawn(child)

    def _announce_when_ready(self) -> None:
        """On its own thread: print the ready line once the server answers ready."""
        args = self.args
        if args.allow_http:
            host = "127.0.0.1" if args.http_address in ("0.0.0.0", "::") else args.http_address

            # Restricted health (--http-restricted-api): ask with its header
            health = parse_restrictions(args.http_restricted_api, "--http-restricted-api")
            extra = "{}: {}\r\n".format(*health["health"]) if "health" in health else ""

            def ready() -> bool:
                return _http_status(host, args.http_port, "/v2/health/ready", extra) == 200
        elif args.allow_grpc and not (args.grpc_use_ssl or args.grpc_use_ssl_mutual):
            host = "127.0.0.1" if args.grpc_address in ("0.0.0.0", "::") else args.grpc_address
            target = f"{host}:{args.grpc_port}"
            restricted = parse_restrictions(
                args.grpc_restricted_protocol, "--grpc-restricted-protocol"
            ).get("health")
            metadata = [(restricted[0].lower(), restricted[1])] if restricted else None

            def ready() -> bool:
                return _grpc_ready(target, metadata)
        else:
            return  # a TLS-only server: checking it would need the client's certificates
        servers = []
        ports = []
        if args.allow_http:
            servers.append(f"HTTP on {args.http_address}:{args.http_port}")
            ports.append(args.http_port)
        if args.allow_grpc:
            servers.append(f"gRPC on {args.grpc_address}:{args.grpc_port}")
            ports.append(args.grpc_port)
        while not self.stopping:
            time.sleep(0.05)
            try:
                if not ready():
                    continue
            except OSError:
                continue
            # One frontend answering is not all of them serving (they share the ports).
            frontends = [c.proc.pid for c in self.children if c.order == 0 and c.proc]
            if not _listening(frontends, ports):
                continue
            print(
                f"Despina is ready: {', '.join(servers)}, "
                f"model repository {', '.join(args.model_repository)}",
                flush=True,
            )
            return

    def _stop_all(self) -> None:
        """Frontends first (they drain), then backend hosts, then the scheduler."""
        deadline = time.monotonic() + self.args.exit_timeout_secs + 5
        for order in sorted({c.order for c in self.children}):
            group = [
                c for c in self.children if c.order == order and c.proc and c.proc.poll() is None
            ]
            for child in group:
                child.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            for child in group:
                while child.proc.poll() is None and time.monotonic() < deadline:  # type: ignore[union-attr]
                    time.sleep(0.02)
                if child.proc.poll() is None:  # type: ignore[union-attr]
                    log.warning("%s did not stop in time; killing it", child.name)
                    child.proc.kill()  # type: ignore[union-attr]
                    child.proc.wait()  # type: ignore[union-attr]
        for child in self.children:
            if child.proc is not None:
                remove_segments_of(child.proc.pid)
        log.info("all services stopped")


def parse_backend_hosts(text: str) -> dict[str, int]:
    """``--backend-hosts``: ``N`` (every framework) or ``framework=N[,framework=N...]``
    -> {framework or "": N}. Raises argparse.ArgumentTypeError (argparse reports it) for
    a count below 1 or another form."""
    counts: dict[str, int] = {}
    for part in text.split(","):
        framework, sep, count = part.strip().rpartition("=")
        if sep and not framework:
            raise ArgumentTypeError(f"'{part}' names no framework")
        if not count.isdigit() or int(count) < 1:
            raise ArgumentTypeError(f"'{part}': the count must be a whole number, 1 or more")
        counts[framework.strip()] = int(count)
    return counts


def hosts_for(values: list[dict[str, int]] | None, framework: str) -> int:
    """How many backend hosts ``framework`` gets from the ``--backend-hosts`` flags
    (later ones win): its own count, else the count for every framework, else 1."""
    counts: dict[str, int] = {}
    for value in values or []:
        counts.update(value)
    return counts.get(framework, counts.get("", 1))


def _folder_names(repositories: list[str]) -> set[str]:
    """Every ``<repository>/<folder>`` name (unreadable repositories count as empty)."""
    names: set[str] = set()
    for repo in repositories:
        try:
            names.update(f"{repo}/{name}" for name in os.listdir(repo))
        except OSError:
            continue
    return names


def _listening(pids: list[int], ports: list[int]) -> bool:
    """Whether every process of ``pids`` listens on every TCP port of ``ports``, read
    from /proc (frontends sharing a port cannot be asked one by one); True where /proc
    cannot tell."""
    sockets: dict[int, set[str]] = {port: set() for port in ports}
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":  # LISTEN
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if port in sockets:
                    sockets[port].add(f"socket:[{fields[9]}]")
    if not readable:
        return True
    for pid in pids:
        try:
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            return False
        if any(held.isdisjoint(listening) for listening in sockets.values()):
            return False
    return True


def _http_status(host: str, port: int, path: str, extra: str = "") -> int:
    """The status code of ``GET path`` (with ``extra`` header lines), from a raw request
    (urllib would load ssl)."""
    name = f"[{host}]" if ":" in host else host
    with socket.create_connection((host, port), timeout=1) as sock:
        head = f"GET {path} HTTP/1.1\r\nHost: {name}\r\n{extra}Connection: close\r\n\r\n"
        sock.sendall(head.encode())
        status_line = sock.makefile("rb").readline(1024)
    parts = status_line.split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return 0


def _grpc_ready(target: str, metadata: list[tuple[str, str]] | None = None) -> bool:
    """ServerReady over gRPC (with ``metadata``), for a server that serves no HTTP."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            request = service_pb2.ServerReadyRequest()
            return stub.ServerReady(request, timeout=1, metadata=metadata).ready
        except grpc.RpcError:
            return False
