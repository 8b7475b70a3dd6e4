"""Every shared-memory block has one owner and a release: after sustained load with
large tensors (through the frontend's input arena and the backend hosts' output arenas),
clients that give up mid-request, and a backend host killed mid-flight, every arena is
empty again and nothing is left in /dev/shm."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import time

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, DespinaServer


def infer_identity(url: str, n: int, seed: int, timeout: float = 60) -> None:
    client = httpclient.InferenceServerClient(
        url, network_timeout=timeout, connection_timeout=timeout
    )
    data = np.random.default_rng(seed).standard_normal((1, n)).astype(np.float32)
    inp = httpclient.InferInput("INPUT0", [1, n], "FP32")
    inp.set_data_from_numpy(data, binary_data=True)
    # Some outputs as JSON (serialized from the mapped block), most as binary.
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=n > 100_000 or seed % 2 == 0)
    result = client.infer("identity_fp32", [inp], outputs=[out])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    client.close()


def test_arenas_are_empty_after_load(tmp_path, generator):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(SHIPPED_REPOSITORY / "identity_fp32", repo / "identity_fp32")
    generator.python_slow(repo)
    srv = DespinaServer(repo, tmp_path / "serve.log").start()
    try:
        sizes = [16 * 1024, 20_000, 300_000, 1 << 20, 5 << 20]  # around and far above 64 KiB
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            jobs = [
                pool.submit(infer_identity, srv.url, sizes[i % len(sizes)], i) for i in range(150)
            ]
            for job in jobs:
                job.result()
        # Clients that give up while their large request runs.
        for i in range(3):
            try:
                infer_identity(srv.url, 4 << 20, 1000 + i, timeout=0.001)
            except Exception:
                pass
        # A backend host killed while it holds lent blocks.
        (pid,) = srv.child_pids("--framework onnxruntime")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            try:
                infer_identity(srv.url, 1 << 20, 7)
                break
            except InferenceServerException:
                assert time.monotonic() < deadline, srv.log()
                time.sleep(0.2)
        pids = srv.child_pids("despina.services")
    finally:
        assert srv.stop() == 0
    log = srv.log()
    frontend = re.findall(r"input arena: (\d+) block\(s\) in use at exit", log)
    backends = re.findall(r"output arena: (\d+) block\(s\) in use at exit", log)
    assert frontend == ["0"], log
    assert backends and set(backends) == {"0"}, log
    left = [
        name
        for name in os.listdir("/dev/shm")
        if any(re.fullmatch(rf"despina_[a-z]+_{pid}_[0-9a-f]+_\d+", name) for pid in pids + [pid])
    ]
    assert left == []
