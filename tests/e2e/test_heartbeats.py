"""A backend host that stops answering without closing its sockets (SIGSTOP: a frozen
process, a hung machine) is found by its missing heartbeats (#17, "Failures").

Over TCP without shared memory (tests/topology.py, ``shm=False``), with a short
heartbeat (interval 250 ms, timeout 1.5 s): under a steady concurrent load of direct
(``simple``, and ``batched``, a plain dynamic batcher) and scheduled (``scheduled``,
priority levels) requests over HTTP and gRPC, the host that serves is frozen. Every
request ends within the heartbeat timeout and a margin, either answered or with
UNAVAILABLE naming the silent host; requests go on succeeding on the other host; the
thawed host finds its stream closed and joins again. Whether the second host serves
from the start (placement per host) or only once the first is gone (a standby), the
test holds.

A Python model's execute holds its instance process's loop: one that computes for
twice the timeout is not a silent host (the heartbeat comes from a thread), while the
frozen instance process is; thawed, it leaves, and its launcher starts it again.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from topology import Load, Topology
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, SPEED_PATHS_OFF

INTERVAL_MS = 250
TIMEOUT_MS = 1500
# A request in flight on the frozen host ends by the timeout plus one check of the
# scheduler (250 ms) plus the time to tell the frontend; the rest is a loaded 2-core
# machine's slack. A hang would last until the test's end (tens of seconds).
BOUND_S = TIMEOUT_MS / 1000 + 2.5
HEARTBEAT_FLAGS = {
    "scheduler_flags": [f"--host-heartbeat-timeout-ms={TIMEOUT_MS}"],
    "host_flags": [f"--host-heartbeat-interval-ms={INTERVAL_MS}"],
}
JOINED = re.compile(r"backend host (\S+) \((\w+), pid (\d+)\) joined")


def _copy_simple(root: Path, name: str, extra: str = "") -> None:
    shutil.copytree(SHIPPED_REPOSITORY / "simple", root / name)
    config = (root / name / "config.pbtxt").read_text()
    (root / name / "config.pbtxt").write_text(
        config.replace('name: "simple"', f'name: "{name}"') + extra
    )


def host_ids(topo: Topology, framework: str) -> dict[int, str]:
    """pid -> host id of each host of ``framework`` that joined, from the scheduler's log."""
    return {int(pid): host_id for host_id, fw, pid in JOINED.findall(topo.log()) if fw == framework}


def workers(topo: Topology, models: list[tuple[str, str]]) -> list:
    """A client per (model, "http" or "grpc") for a ``Load`` (tests/topology.py): each
    request's outputs checked, a short pause between requests."""

    def opener(model: str, proto: str):
        if proto == "http":
            module, client = (
                httpclient,
                httpclient.InferenceServerClient(topo.url, network_timeout=120),
            )
        else:
            module, client = grpcclient, grpcclient.InferenceServerClient(topo.grpc_url)

        def send(n: int) -> None:
            a = np.arange(n, n + 16, dtype=np.int32).reshape(1, 16)
            b = np.full((1, 16), 3, dtype=np.int32)
            inputs = [module.InferInput(x, [1, 16], "INT32") for x in ("INPUT0", "INPUT1")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            try:
                result = client.infer(model, inputs)
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
                np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
            finally:
                time.sleep(0.005)

        return send, client.close

    return [(model, functools.partial(opener, model, proto)) for model, proto in models]


def wait_successes(load: Load, topo: Topology, models: set[str], since: float) -> None:
    """Each of ``models`` answered a request sent after ``since``, within 20 s."""
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        ok = {o.label for o in load.snapshot() if o.error is None and o.start > since}
        if models <= ok:
            return
        time.sleep(0.05)
    pytest.fail(
        f"no success since {since} for {models - ok}:\n"
        + "\n".join(f"{o.label} {o.error}" for o in load.snapshot()[-20:])
        + "\n"
        + topo.log()[-6000:]
    )


def unavailable(error: BaseException) -> bool:
    return isinstance(error, InferenceServerException) and error.status() in (
        "503",
        "StatusCode.UNAVAILABLE",
    )


# --- ONNX Runtime: two hosts, one frozen under load ---------------------------------------


@pytest.fixture(scope="module")
def onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("beat_repo")
    _copy_simple(root, "simple")
    _copy_simple(root, "batched", "dynamic_batching { max_queue_delay_microseconds: 500 }\n")
    _copy_simple(
        root, "scheduled", "dynamic_batching { priority_levels: 2 default_priority_level: 1 }\n"
    )
    topo = Topology(
        tmp_path_factory.mktemp("beat"),
        root,
        hosts={"onnxruntime": 2},
        shm=False,
        **HEARTBEAT_FLAGS,
    )
    try:
        topo.wait_ready()
        for model in ("simple", "batched", "scheduled"):
            topo.wait_ready(model=model)
        yield topo
    finally:
        topo.stop()


def test_frozen_host_under_load_no_request_hangs(onnx):
    topo = onnx
    models = {"simple", "batched", "scheduled"}
    ids = host_ids(topo, "onnxruntime")
    loaded = re.findall(r" (\d+) backend-onnxruntime \S+\] loaded 'simple'", topo.log())
    frozen = next(s for s in topo.host_services() if str(s.pid) in loaded)
    other = next(s for s in topo.host_services() if s is not frozen)
    frozen_id = ids[frozen.pid]
    load = Load(
        workers(
            topo,
            [
                ("simple", "http"),
                ("simple", "grpc"),
                ("batched", "http"),
                ("scheduled", "http"),
                ("scheduled", "grpc"),
            ],
        ),
        join_s=BOUND_S + 30,
    )
    with load:
        wait_successes(load, topo, models, 0.0)
        topo.freeze(frozen)
        frozen_at = time.monotonic()
        try:
            topo.wait_log(f"backend host {frozen_id} (onnxruntime, pid {frozen.pid}) is gone")
            # The other host serves every model, requests sent after the host was found
            # silent included.
            wait_successes(load, topo, models, time.monotonic())
        finally:
            topo.thaw(frozen)
        thawed_at = time.monotonic()
    outcomes = load.snapshot()
    log = topo.log()
    assert "stopped answering (no heartbeat for" in log

    # No request outlived the bound; each either answered or failed UNAVAILABLE naming
    # the silent host (and only around the freeze).
    longest = max(outcomes, key=lambda o: o.end - o.start)
    assert longest.end - longest.start < BOUND_S, (longest, log[-6000:])
    failed = [o for o in outcomes if o.error is not None]
    for o in failed:
        assert unavailable(o.error), o.error
        assert frozen_id in o.error.message() or f"pid {frozen.pid}" in o.error.message(), (
            o.error.message()
        )
        assert "stopped answering" in o.error.message(), o.error.message()
        assert frozen_at - 0.5 < o.end < frozen_at + BOUND_S, (o, frozen_at)
    assert sum(o.error is None and o.start > frozen_at for o in outcomes) > 10
    assert not [o for o in outcomes if o.error is not None and o.start > frozen_at + BOUND_S]

    # Thawed, the host finds its stream cut and joins again as a new host; the model
    # keeps serving.
    topo.wait_log(f"backend host {frozen_id} (onnxruntime, pid {frozen.pid}) joined", count=2)
    assert frozen.alive() and other.alive()
    again = Load(workers(topo, [("simple", "http"), ("scheduled", "grpc")]), join_s=BOUND_S + 30)
    with again:
        wait_successes(again, topo, {"simple", "scheduled"}, thawed_at)
    assert all(o.error is None for o in again.snapshot())


# --- Python: an instance process that computes long is alive; a frozen one is not ------

SPIN_PY = """\
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            ms = int(pb_utils.get_input_tensor_by_name(request, "SPIN_MS").as_numpy()[0])
            end = time.monotonic() + ms / 1000
            while time.monotonic() < end:  # computes, holding the GIL and the loop
                pass
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("PID", np.array([os.getpid()], np.int64))]
                )
            )
        return responses
"""

SPIN_CONFIG = """\
name: "spin"
backend: "python"
max_batch_size: 0
input [ { name: "SPIN_MS" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "PID" data_type: TYPE_INT64 dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
"""


@pytest.fixture(scope="module")
def python(tmp_path_factory):
    root = tmp_path_factory.mktemp("beat_py_repo")
    (root / "spin" / "1").mkdir(parents=True)
    (root / "spin" / "config.pbtxt").write_text(SPIN_CONFIG)
    (root / "spin" / "1" / "model.py").write_text(SPIN_PY)
    topo = Topology(
        tmp_path_factory.mktemp("beat_py"),
        root,
        hosts={"python": 1},
        shm=False,
        **HEARTBEAT_FLAGS,
    )
    try:
        topo.wait_ready()
        topo.wait_ready(model="spin")
        yield topo
    finally:
        topo.stop()


def spin(url: str, ms: int) -> tuple[int | None, InferenceServerException | None, float]:
    client = httpclient.InferenceServerClient(url, network_timeout=120)
    inp = httpclient.InferInput("SPIN_MS", [1], "INT32")
    inp.set_data_from_numpy(np.array([ms], np.int32))
    start = time.monotonic()
    try:
        return int(client.infer("spin", [inp]).as_numpy("PID")[0]), None, time.monotonic() - start
    except InferenceServerException as exc:
        return None, exc, time.monotonic() - start
    finally:
        client.close()


def test_python_execute_longer_than_the_timeout_is_not_silence(python):
    """An execute that computes for twice the heartbeat timeout, on the instance
    process's loop, answers: its heartbeat thread kept beating."""
    pid, error, took = spin(python.url, 2 * TIMEOUT_MS)
    assert error is None, error
    assert pid is not None and took >= 2 * TIMEOUT_MS / 1000
    assert "stopped answering" not in python.log()


def test_python_instance_frozen_mid_request(python):
    """The frozen instance process's request is sent again, by its frontend, to the
    model's other instance once the scheduler declares the frozen one gone (within the
    bound), and answers from there; the model goes on serving on the other instance."""
    pids = connected(python)
    first, error, _ = spin(python.url, 0)
    assert error is None and first in pids and len(pids) == 2, (error, first, pids)
    results: list = []
    worker = threading.Thread(target=lambda: results.append(spin(python.url, 5000)), daemon=True)
    worker.start()
    # The request now runs in an instance process: the one the next request does not use
    # while it computes (direct routes pick the least busy instance).
    time.sleep(0.5)
    idle, error, _ = spin(python.url, 0)
    assert error is None, error
    [busy] = pids - {idle}
    os.kill(busy, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        worker.join(BOUND_S + 5 + 3)  # declared gone, then its 5 s again elsewhere
        assert not worker.is_alive(), "the request to the frozen instance hangs"
        [(pid, error, took)] = results
        assert error is None and pid == idle, (pid, error)
        assert took >= 5 + 0.5 and time.monotonic() - frozen_at < BOUND_S + 5 + 1
        # Sent again by its frontend (a direct route) or, with the speed paths off, by
        # the scheduler (a scheduled one).
        resent = (
            "sending the requests that were in flight on a lost backend host"
            if SPEED_PATHS_OFF
            else "was lost; sent again to"
        )
        assert f"-{busy}" in python.log() and resent in python.log()
        for _ in range(4):  # the other instance serves
            pid, error, _ = spin(python.url, 0)
            assert error is None and pid == idle, (pid, error)
    finally:
        os.kill(busy, signal.SIGCONT)
    # Thawed, the instance process finds its stream cut and leaves; its launcher starts
    # it again, and the new process joins as the model's second instance.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(connected(python)) < 3:
        time.sleep(0.1)
    assert len(connected(python)) == 3, python.log()[-6000:]
    [fresh] = connected(python) - pids
    seen: set[int] = set()
    while time.monotonic() < deadline and fresh not in seen:
        # Two at once: the second goes to the instance the first does not hold.
        pair: list = []
        workers = [
            threading.Thread(target=lambda out=pair: out.append(spin(python.url, 300)))
            for _ in range(2)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(30)
        for pid, error, _ in pair:
            assert error is None, error
            seen.add(pid)
    assert fresh in seen, (fresh, seen)


def connected(topo: Topology) -> set[int]:
    """The pids of the ``spin`` instance processes that connected to the scheduler (an
    instance process's host id ends with its pid)."""
    return {
        int(p)
        for p in re.findall(r"backend host python-spin-\S+-(\d+) \(python\) connected", topo.log())
    }
