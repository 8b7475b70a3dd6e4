"""``despina serve`` on free loopback ports, for the loadtest scripts that measure
Despina alone (ab.py, overhead.py, compare's ONNX rows, experiments/): started, waited
for, always stopped; and ``despina perf`` run against it as a child process (its CPU is
then the client's alone, and the parent's own work does not slow it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PERF = ["-m", "despina.services.perf"]  # `despina perf`, with this interpreter


def perf_argv(
    url: str,
    model: str,
    protocol: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    *extra: str,
) -> list[str]:
    """The command line of one despina perf run (closed loop at ``concurrency``)."""
    return [
        sys.executable,
        *PERF,
        "--url",
        url,
        "--model",
        model,
        "--protocol",
        protocol,
        "-c",
        str(concurrency),
        "-d",
        str(seconds),
        "--warmup",
        str(warmup),
        *extra,
    ]


def perf_run(
    url: str,
    model: str,
    protocol: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    *extra: str,
) -> dict:
    """One despina perf run (``perf_argv``'s arguments); its result record. Raises
    subprocess.CalledProcessError, with despina perf's stderr, when the run fails."""
    out = subprocess.run(
        perf_argv(url, model, protocol, concurrency, seconds, warmup, *extra)
        + ["--json-out", "/dev/stdout"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout[out.stdout.index("{") :])["runs"][0]


def proc_stat_busy() -> tuple[float, float]:
    """CPU seconds this machine spent busy, and those the hypervisor stole from it."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def despina_overlay(ref: str, tmp: Path) -> str:
    """A PYTHONPATH under which ``despina`` is the code of git ``ref`` (the editable
    install's finder comes after PYTHONPATH)."""
    src = tmp / "despina-src"
    site = tmp / "despina-site" / "despina"
    src.mkdir(parents=True)
    site.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "common", "services"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    (site / "common").symlink_to(src / "common")
    (site / "services").symlink_to(src / "services")
    return str(site.parent)


@contextlib.contextmanager
def steal_meter() -> Iterator[dict]:
    """Measures the block: afterwards ``meter["steal_cores"]`` holds the CPU (in cores)
    the hypervisor stole while it ran."""
    meter: dict = {}
    (_, steal0), t0 = proc_stat_busy(), time.perf_counter()
    try:
        yield meter
    finally:
        (_, steal1), t1 = proc_stat_busy(), time.perf_counter()
        meter["steal_cores"] = round((steal1 - steal0) / (t1 - t0), 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    log: str

    def url_for(self, protocol: str) -> str:
        """despina perf's ``--url`` for one of its protocols."""
        if protocol.startswith("grpc"):
            return f"127.0.0.1:{self.grpc_port}"
        return f"http://127.0.0.1:{self.http_port}"


@contextlib.contextmanager
def despina(
    extra_args: list[str], tag: str, timeout: float = 60.0, env: dict | None = None
) -> Iterator[Served]:
    """Serve the shipped repository until the block ends; SystemExit if never ready.
    ``env``: the server's environment (compare's ``--despina-ref`` sets PYTHONPATH)."""
    http, grpc = free_port(), free_port()
    log = tempfile.NamedTemporaryFile(prefix=f"despina-{tag}-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "despina.services.cli",
            "serve",
            f"--model-repository={ROOT / 'model_repository'}",
            f"--http-port={http}",
            f"--grpc-port={grpc}",
            f"--metrics-port={free_port()}",  # arms up at once must not share 8002
            *extra_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                url = f"http://127.0.0.1:{http}/v2/health/ready"
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"despina did not become ready; log in {log.name}")
            time.sleep(0.1)
        yield Served(proc, http, grpc, log.name)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
