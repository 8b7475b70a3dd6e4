"""--busy-poll-us: under light load a frontend and a backend host poll for the answer
they expect instead of sleeping, so a request at concurrency 1 wakes neither of them;
with 0 they sleep between messages; an idle server polls not at all.

A process that sleeps in epoll_wait counts a voluntary context switch each time
(/proc/PID/status); one that polls counts none (its sched_yield is involuntary).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from conftest import SHIPPED_REPOSITORY, DespinaServer, needs_speed_path

REQUESTS = 200
# Long enough that the gap between this test's requests always falls inside it.
BUDGET_US = 20_000


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    repo = tmp_path_factory.mktemp("busy-poll-repo")
    shutil.copytree(SHIPPED_REPOSITORY / "simple", repo / "simple")
    logs = tmp_path_factory.mktemp("busy-poll-logs")
    started = {}
    try:
        for budget in (0, BUDGET_US):
            started[budget] = DespinaServer(
                repo, logs / f"serve-{budget}.log", [f"--busy-poll-us={budget}"]
            ).start()
        yield started
    finally:
        for srv in started.values():
            srv.stop()


def _voluntary_switches(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for {pid}")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in ticks of 10 ms


def _pids(srv: DespinaServer) -> dict[str, int]:
    (frontend,) = srv.child_pids("despina.services.frontend")
    (host,) = srv.child_pids("--framework onnxruntime")
    return {"frontend": frontend, "host": host}


def _drive(srv: DespinaServer, count: int) -> None:
    client = httpclient.InferenceServerClient(srv.url)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    inputs = [
        httpclient.InferInput("INPUT0", [1, 16], "INT32"),
        httpclient.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a, binary_data=True)
    inputs[1].set_data_from_numpy(b, binary_data=True)
    for _ in range(count):
        result = client.infer("simple", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    client.close()


def _sleeps_per_request(srv: DespinaServer) -> dict[str, float]:
    _drive(srv, 20)  # warm: connections made, the poll's miss count settled
    pids = _pids(srv)
    before = {role: _voluntary_switches(pid) for role, pid in pids.items()}
    _drive(srv, REQUESTS)
    return {
        role: (_voluntary_switches(pid) - before[role]) / REQUESTS for role, pid in pids.items()
    }


def test_the_flag_reaches_every_frontend_and_backend_host(servers):
    for budget, srv in servers.items():
        for pid in _pids(srv).values():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert f"--busy-poll-us={budget}".encode() in cmdline


def test_without_polling_each_process_sleeps_for_every_request(servers):
    sleeps = _sleeps_per_request(servers[0])
    # The frontend waits for the client and for the host; the host for the frontend.
    assert sleeps["frontend"] >= 1.5, sleeps
    assert sleeps["host"] >= 0.8, sleeps


@needs_speed_path("loop execution (a host polls only while no execution is on a thread)")
def test_with_polling_neither_sleeps_while_an_answer_is_due(servers):
    sleeps = _sleeps_per_request(servers[BUDGET_US])
    # The frontend still sleeps while the client prepares its next request (nothing is
    # due then); the host polls through that gap and the frontend through the host's.
    assert sleeps["frontend"] < 1.3, sleeps
    assert sleeps["host"] < 0.3, sleeps


def test_an_idle_server_does_not_poll(servers):
    srv = servers[BUDGET_US]
    _drive(srv, 20)
    time.sleep(2 * BUDGET_US / 1e6)  # the last poll's budget runs out
    pids = _pids(srv)
    before = {role: _cpu_seconds(pid) for role, pid in pids.items()}
    time.sleep(1.0)
    used = {role: _cpu_seconds(pid) - before[role] for role, pid in pids.items()}
    assert all(seconds <= 0.03 for seconds in used.values()), used
