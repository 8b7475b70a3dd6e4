"""The Python backend host: each Python model instance in a process of its own.

``PythonLauncher`` is the ``--framework python`` backend host. On ``LoadModel`` it starts
one instance process per instance; each instance process loads ``model.py``, then joins
the scheduler as a backend host of its own serving that one instance, so requests reach
the model with no extra hop (Triton's stub adds one). The launcher restarts an instance
process that dies, and stops them on unload and shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from despina.common import messages as m
from despina.common.model_config import config_json
from despina.common.process import die_with_parent
from despina.common.shm.arena import remove_segments_of
from despina.services.backend_host.worker import BackendHost, instance_specs

log = logging.getLogger("despina.python_launcher")

LOAD_FAILED_EXIT = 3
CONFIG_ENV = "DESPINA_MODEL_CONFIG"


@dataclass(eq=False)
class Child:
    model: str
    version: str
    index: int
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    wanted: bool = True


class PythonLauncher:
    def __init__(self, host: BackendHost, scheduler_endpoint: str, log_verbose: int) -> None:
        self.host = host
        self.scheduler_endpoint = scheduler_endpoint
        self.log_verbose = log_verbose
        self.children: list[Child] = []
        host.on_load = self.load
        host.on_unload = self.unload
        host.on_rejoin = self.stop_all

    def load(self, msg: m.LoadModel) -> None:
        error = ""
        try:
            for spec in instance_specs(msg):
                child = Child(
                    msg.model,
                    msg.version,
                    spec.instance_index,
                    [
                        sys.executable,
                        "-m",
                        "despina.services.backend_host",
                        "--framework",
                        "python",
                        "--scheduler",
                        self.scheduler_endpoint,
                        "--log-verbose",
                        str(self.log_verbose),
                        "--instance-of",
                        f"{msg.model}:{msg.version}:{spec.instance_index}",
                        "--model-dir",
                        msg.model_dir,
                        "--instance-kind",
                        spec.kind,
                        "--device-id",
                        str(spec.device_id),
                    ],
                    {**os.environ, CONFIG_ENV: config_json(spec.config).decode()},
                )
                self.children.append(child)
                self._spawn(child)
        except OSError as exc:
            error = f"could not start a Python instance process: {exc}"
        # The instances report themselves to the scheduler when their model is initialized.
        self.host._send(m.LoadResult(msg.model, msg.version, [], error))

    def _spawn(self, child: Child) -> None:
        if not child.wanted or child not in self.children:
            return  # unloaded, or every child was stopped, while its restart waited
        child.proc = subprocess.Popen(child.argv, env=child.env, preexec_fn=die_with_parent)
        log.info(
            "started instance %s_%d (version %s) as pid %d",
            child.model,
            child.index,
            child.version,
            child.proc.pid,
        )

    def unload(self, msg: m.UnloadModel) -> None:
        for child in [c for c in self.children if (c.model, c.version) == (msg.model, msg.version)]:
            child.wanted = False
            self._terminate(child)
            self.children.remove(child)

    @staticmethod
    def _terminate(child: Child) -> None:
        if child.proc is not None and child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)

    async def supervise(self) -> None:
        """Restart instance processes that died, unless their model failed to load."""
        while True:
            await asyncio.sleep(0.1)
            for child in list(self.children):
                if child.proc is None or child.proc.poll() is None or not child.wanted:
                    continue
                code = child.proc.returncode
                remove_segments_of(child.proc.pid)  # what a crash left in /dev/shm
                if code == LOAD_FAILED_EXIT:
                    self.children.remove(child)
                    continue
                child.restarts += 1
                delay = min(5.0, 0.1 * 2 ** min(child.restarts, 6))
                log.error(
                    "instance %s_%d (pid %d) exited with %s; restarting in %.1fs",
                    child.model,
                    child.index,
                    child.proc.pid,
                    code,
                    delay,
                )
                child.proc = None
                asyncio.get_running_loop().call_later(delay, self._spawn, child)

    def stop_all(self, timeout: float = 10.0) -> None:
        children, self.children = self.children, []
        for child in children:
            child.wanted = False
            self._terminate(child)
        deadline = time.monotonic() + timeout
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
