"""``despina serve`` on free loopback ports, for the loadtest scripts that measure
Despina alone (hops.py, tensors.py, overhead.py, compare's ONNX rows): started, waited
for, always stopped."""

from __future__ import annotations

import contextlib
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
