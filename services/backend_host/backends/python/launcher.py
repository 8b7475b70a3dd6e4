"""The Python backend host: each Python model instance in a process of its own.

``PythonLauncher`` is the ``--framework python`` backend host. It holds a stream to the
scheduler and, on ``LoadModel``, starts one process per instance; each instance process
loads ``model.py``, then joins the scheduler as a backend host of its own serving that
one instance, so requests reach the model with no extra hop (Triton's stub adds one).
The launcher restarts an instance process that dies, and stops them on unload and
shutdown.

Instance processes are forked from the launcher, which has imported what they run
(numpy, uvloop, the worker, the Python backend) before it forks: an instance is up in
milliseconds instead of after ~0.3 s of CPU for those imports, and their pages stay
shared between the launcher and its instances instead of each process holding ~20 MiB
of its own. For the fork to be clean the launcher runs no event loop and no thread of
its own: a selector over its one socket and a signal wake-up fd, ticking every 0.1 s.
A forked process leaves the launcher's loop by unwinding out of it (``run`` returns its
``InstanceSpec``), closes its copies of the launcher's descriptors, takes back the
default signal handling, and only then starts its own event loop
(``__main__.run_instance``). The model is imported after the fork, in its own process.
What the model sees of its process is what Triton's stub gives it: ``sys.argv == [""]``
(the host's flags are parsed before the launcher starts), the server's working directory
and environment (both inherited, none added), and the version and model folders on
``sys.path`` (``backend.py``).
Protobuf, which only the launcher needs (to read a ``LoadModel``'s config), is loaded in
a short-lived forked child (``common.process.call_forked``), so it is in neither.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import selectors
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from despina.common import logs, streams
from despina.common import messages as m
from despina.common.errors import Code, ServerError
from despina.common.process import call_forked, die_with_parent, release_free_memory
from despina.common.shm.arena import remove_segments_of
from despina.services.backend_host.backend import InstanceSpec, config_json
from despina.services.backend_host.executor import instance_specs

log = logging.getLogger("despina.python_launcher")

LOAD_FAILED_EXIT = 3
TICK_S = 0.1
SEND_TIMEOUT_S = 10.0
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@dataclass(eq=False)
class Child:
    spec: InstanceSpec  # config: Triton's JSON form (the instance loads no protobuf)
    pid: int | None = None
    returncode: int | None = None
    restarts: int = 0
    wanted: bool = True
    restart_at: float | None = None  # monotonic time of a pending restart

    @property
    def name(self) -> str:
        return f"{self.spec.model_name}_{self.spec.instance_index}"

    def poll(self) -> int | None:
        """The exit code once the process has exited (and is reaped), else None."""
        if self.pid is None or self.returncode is not None:
            return self.returncode
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.returncode = -1
            return self.returncode
        if pid == 0:
            return None
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def instances_of(loads: list[m.LoadModel]) -> list[tuple[list[InstanceSpec], bytes] | str]:
    """For each message, its instance specs with the config in Triton's JSON form (what
    an instance reads, and its model's ``initialize`` gets) and the serialized config
    the model's ``auto_complete_config`` completed (empty when it has none), or why it
    cannot be read. Imports the models that auto-complete: run it in a forked child."""
    out: list[tuple[list[InstanceSpec], bytes] | str] = []
    for msg in loads:
        try:
            completed = _auto_complete(msg)
            if completed:
                msg = m.LoadModel(msg.model, msg.version, msg.model_dir, completed, msg.instances)
            specs = instance_specs(msg)
            config = config_json(specs[0].config) if specs else b""
            for spec in specs:
                spec.config = config
            out.append((specs, completed))
        except Exception as exc:
            out.append(
                exc.message if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
            )
    return out


def _auto_complete(msg: m.LoadModel) -> bytes:
    """The LoadModel's config as the model's ``auto_complete_config`` completes it,
    serialized, validated; empty when the model has no such method or changed nothing."""
    from google.protobuf import json_format

    from despina.common import model_config
    from despina.services.backend_host.backends.python.backend import complete_config

    original = model_config.ModelConfig()
    original.ParseFromString(msg.config)
    sys.argv = stub_argv()  # the model is imported as its instances will import it
    completed = complete_config(
        model_config.config_json(original), Path(msg.model_dir), msg.version
    )
    if completed is None:
        return b""
    config = model_config.ModelConfig()
    try:
        json_format.Parse(completed, config)
    except json_format.ParseError as exc:
        raise ServerError(
            Code.INVALID_ARG,
            f"auto_complete_config of model '{msg.model}' made an invalid config: {exc}",
        ) from None
    model_config.validate(config)
    serialized = config.SerializeToString()
    return b"" if serialized == msg.config else serialized


def stub_argv() -> list[str]:
    """``sys.argv`` as a model sees it under Triton: its stub embeds Python with pybind11
    and no arguments, which leaves ``[""]``. A model that parses its arguments
    (argparse, ``unittest.main``) then finds none instead of the backend host's flags.
    ``sys.orig_argv`` keeps the real command line."""
    return [""]


class _Forked(BaseException):
    """Raised in a new instance process to unwind it out of the launcher's loop (a
    BaseException, so no ``except Exception`` on the way catches it)."""

    def __init__(self, spec: InstanceSpec, signal_mask: set[int | signal.Signals]) -> None:
        super().__init__()
        self.spec = spec
        self.signal_mask = signal_mask


class _SocketTransport(asyncio.Transport):
    """What ``streams.FramedProtocol`` needs of a transport, over a socket this launcher
    reads itself: the framing stays in one place. Writes block (the launcher sends only
    small control messages), up to SEND_TIMEOUT_S."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self._closing = False

    def write(self, data: Any) -> None:
        if self._closing:
            return
        try:
            self._sock.sendall(data)
        except OSError as exc:
            log.warning("sending to the scheduler failed: %s", exc)
            self._closing = True  # the next read sees the stream end

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._sock if name == "socket" else default

    def close(self) -> None:
        self._closing = True
        self._sock.close()


class PythonLauncher:
    def __init__(self, scheduler_endpoint: str, host_id: str | None = None) -> None:
        self.scheduler_endpoint = scheduler_endpoint
        self.host_id = host_id or f"python-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.children: list[Child] = []
        self._exiting: list[Child] = []  # unloaded, not reaped yet
        self._pid = os.getpid()
        self._stopping = False
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._link: streams.FramedProtocol | None = None
        self._sock: socket.socket | None = None
        self._encode = m.encoder().encode
        self._decode = m.decoder(m.HostInbound).decode

    # --- lifecycle ---------------------------------------------------------------------

    def run(self) -> InstanceSpec | None:
        """Serve until SIGTERM or SIGINT, then stop every instance and return None. In a
        forked instance process this returns that instance's spec instead: the caller
        runs the instance."""
        self._install_signals()
        release_free_memory()  # what the imports freed: the instances would inherit it too
        try:
            self._serve()
        except _Forked as forked:
            self._become_instance(forked.signal_mask)
            return forked.spec
        self.stop_all()
        self._close()
        return None

    def _install_signals(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _serve(self) -> None:
        backoff = 0.05
        next_connect = 0.0
        while not self._stopping:
            now = time.monotonic()
            timeout = TICK_S
            if self._link is None:
                if now >= next_connect:
                    if self._connect():
                        backoff = 0.05
                    else:
                        next_connect = now + backoff
                        backoff = min(2.0, backoff * 2)
                if self._link is None:
                    timeout = min(TICK_S, max(0.0, next_connect - time.monotonic()))
            for key, _ in self._selector.select(timeout):
                key.data()
            self._tick()

    def _close(self) -> None:
        """Close the launcher's descriptors (in a forked instance: its copies of them)."""
        signal.set_wakeup_fd(-1)
        if self._link is not None:
            self._link.close()
        self._link = self._sock = None
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _become_instance(self, signal_mask: set[int | signal.Signals]) -> None:
        """In a new instance process: leave nothing of the launcher behind."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self._close()
        self.children, self._exiting = [], []
        die_with_parent()
        if os.getppid() != self._pid:
            os._exit(1)  # the launcher died before this process asked to follow it
        signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)
        # The inherited objects stay where they are: the collector leaves them alone, so
        # their pages stay shared with the launcher.
        gc.freeze()
        numpy_random = sys.modules.get("numpy.random")
        if numpy_random is not None:
            numpy_random.seed()  # as a fresh process would be (Python's random reseeds itself)
        # The host's flags were parsed before the launcher started: from here on the
        # process is the model's, and a model sees what Triton's stub gives it.
        sys.argv = stub_argv()

    # --- the scheduler -------------------------------------------------------------------

    def _connect(self) -> bool:
        where, port = streams.parse_endpoint(self.scheduler_endpoint)
        try:
            if port:
                sock = socket.create_connection((where, port), timeout=2.0)
                secret = streams.cluster_secret()
                if secret is not None:
                    try:
                        streams.authenticate_blocking(sock, secret)
                    except OSError:
                        sock.close()
                        raise
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(2.0)
                    sock.connect(where)
                except OSError:
                    sock.close()
                    raise
        except OSError as exc:
            log.debug("scheduler not reachable at %s yet: %s", self.scheduler_endpoint, exc)
            return False
        sock.settimeout(SEND_TIMEOUT_S)
        link = streams.FramedProtocol(lambda _link, burst: self._on_burst(burst))
        link.connection_made(_SocketTransport(sock))
        self._sock, self._link = sock, link
        self._selector.register(sock, selectors.EVENT_READ, self._read)
        self._send(m.HostHello(m.PROTOCOL_VERSION, self.host_id, "python", os.getpid()))
        log.info("backend host %s (python) connected to %s", self.host_id, self.scheduler_endpoint)
        return True

    def _read(self) -> None:
        if self._sock is None or self._link is None:
            return
        try:
            data = self._sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError:
            data = b""
        if data:
            self._link.data_received(data)
        else:
            self._lost()

    def _lost(self) -> None:
        if self._sock is not None:
            self._selector.unregister(self._sock)
        if self._link is not None:
            self._link.close()
        self._link = self._sock = None
        if not self._stopping:
            log.warning("lost the scheduler at %s", self.scheduler_endpoint)
            self.stop_all()  # join again with a clean slate

    def _send(self, msg: msgspec.Struct) -> None:
        if self._link is None or not self._link.send([self._encode(msg)]):
            log.warning("could not send %s to the scheduler", type(msg).__name__)

    def _on_burst(self, burst: list[list]) -> None:
        msgs = []
        for frames in burst:
            try:
                msgs.append(self._decode(frames[0]))
            except msgspec.DecodeError as exc:
                log.warning("dropping an undecodable message: %s", exc)
        loads = [msg for msg in msgs if isinstance(msg, m.LoadModel)]
        # Reading a config takes protobuf, which instance processes do not need: it is
        # loaded in a forked child, once for the whole burst, and never here.
        instances = iter(call_forked(instances_of, loads) if loads else [])
        for msg in msgs:
            if isinstance(msg, m.LoadModel):
                self.load(msg, next(instances))
            elif isinstance(msg, m.UnloadModel):
                self.unload(msg)
            elif isinstance(msg, m.Settings):  # the logging extension's, from the scheduler
                logs.apply(msg.log)
            elif isinstance(msg, m.StatsFlush):  # nothing is counted here: say so at once
                self._send(m.StatsReport([], msg.token))

    # --- instances ---------------------------------------------------------------------

    def load(self, msg: m.LoadModel, specs: tuple[list[InstanceSpec], bytes] | str) -> None:
        """Start the processes of ``specs`` (``instances_of`` of ``msg``: the specs, or
        why the message could not be read)."""
        error = specs if isinstance(specs, str) else ""
        completed = b"" if isinstance(specs, str) else specs[1]
        if completed and not error:
            # Before any instance starts: the scheduler takes the completed config
            # (services/scheduler/autocomplete.py) before an instance can join.
            self._send(m.LoadResult(msg.model, msg.version, [], "", completed))
        try:
            for spec in [] if isinstance(specs, str) else specs[0]:
                child = Child(spec)
                self.children.append(child)
                self._spawn(child)
        except OSError as exc:
            error = f"could not start a Python instance process: {exc}"
        if error:
            log.error("loading '%s' failed: %s", msg.model, error)
        # The instances report themselves to the scheduler when their model is initialized.
        self._send(m.LoadResult(msg.model, msg.version, [], error))

    def _spawn(self, child: Child) -> None:
        if not child.wanted or child not in self.children:
            return  # unloaded, or every child was stopped, while its restart waited
        # The new process starts with SIGINT/SIGTERM blocked until it has dropped the
        # launcher's handlers (which would only set this launcher's flag).
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the new process would write what is buffered again
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid == 0:
            raise _Forked(child.spec, mask)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child.pid, child.returncode = pid, None
        log.info("started instance %s (version %s) as pid %d", child.name, child.spec.version, pid)

    def unload(self, msg: m.UnloadModel) -> None:
        for child in [
            c
            for c in self.children
            if (c.spec.model_name, c.spec.version) == (msg.model, msg.version)
            and (msg.instances is None or c.spec.instance_index in msg.instances)
        ]:
            child.wanted = False
            self._terminate(child)
            self.children.remove(child)
            if child.pid is not None:
                self._exiting.append(child)

    @staticmethod
    def _terminate(child: Child) -> None:
        if child.pid is not None and child.poll() is None:
            try:
                os.kill(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _tick(self) -> None:
        """Reap instance processes that exited; restart those that died, unless their
        model failed to load; start restarts that are due."""
        now = time.monotonic()
        for child in list(self.children):
            if child.pid is None:
                if child.restart_at is not None and now >= child.restart_at:
                    child.restart_at = None
                    try:
                        self._spawn(child)
                    except OSError as exc:
                        log.error("could not restart instance %s: %s", child.name, exc)
                        child.restart_at = now + 1.0
                continue
            code = child.poll()
            if code is None:
                continue
            remove_segments_of(child.pid)  # what a crash left in /dev/shm
            if code == LOAD_FAILED_EXIT:
                self.children.remove(child)
                continue
            child.restarts += 1
            delay = min(5.0, 0.1 * 2 ** min(child.restarts, 6))
            log.error(
                "instance %s (pid %d) exited with %s; restarting in %.1fs",
                child.name,
                child.pid,
                code,
                delay,
            )
            child.pid, child.restart_at = None, now + delay
        for child in list(self._exiting):
            if child.poll() is not None:
                remove_segments_of(child.pid)  # type: ignore[arg-type]
                self._exiting.remove(child)

    def stop_all(self, timeout: float = 10.0) -> None:
        children = self.children + self._exiting
        self.children, self._exiting = [], []
        for child in children:
            child.wanted = False
            self._terminate(child)
        deadline = time.monotonic() + timeout
        for child in children:
            if child.pid is None:
                continue
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                os.waitpid(child.pid, 0)
            remove_segments_of(child.pid)
