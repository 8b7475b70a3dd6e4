"""Adding a backend host adds capacity (#17), over TCP only (tests/topology.py with
``shm=False``: no shared memory between the services, every tensor rides the sockets).

Placement ``per-host`` (the default): two ONNX Runtime hosts each load the model's
instances and both execute requests, through direct routes (a client sending one
request at a time alternates over the hosts) and through the scheduler (a model with
priority levels); a third host joins under load, takes instances and serves while no
request fails; a host that leaves takes its instances with it and the model stays READY
and serving. Placement ``spread``: a count of 2 over two hosts is one instance on each,
and a host that leaves has its instance placed again on the other.

The evidence is each host's verbose log line ``execute <model>:<version> on instance N``,
which carries the host's pid (common/logs.py's line layout).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from topology import Load, Topology

from conftest import SHIPPED_REPOSITORY, needs_speed_path

DEADLINE_S = 20.0
EXECUTE = re.compile(
    r" (\d+) backend-onnxruntime \S+\] execute (\S+):\d+ on instance (\d+) \((\w+)\)"
)


def _copy_simple(root: Path, name: str, count: int, extra: str = "") -> None:
    """The shipped ``simple`` model (INT32 add/sub) as ``name`` with ``count`` instances."""
    shutil.copytree(SHIPPED_REPOSITORY / "simple", root / name)
    config = (root / name / "config.pbtxt").read_text()
    config = config.replace('name: "simple"', f'name: "{name}"').replace(
        "count: 1", f"count: {count}"
    )
    (root / name / "config.pbtxt").write_text(config + extra)


def _topology(tmp_path_factory, flags: list[str], models: dict[str, tuple[int, str]]) -> Topology:
    root = tmp_path_factory.mktemp("scale_repo")
    for name, (count, extra) in models.items():
        _copy_simple(root, name, count, extra)
    return Topology(
        tmp_path_factory.mktemp("scale"),
        root,
        hosts={"onnxruntime": 2},
        shm=False,
        # The scheduler's log settings reach every host (the logging extension).
        scheduler_flags=[*flags, "--log-verbose=1"],
    )


@pytest.fixture(scope="module")
def per_host(tmp_path_factory):
    """Two ONNX Runtime hosts, placement per-host: ``simple`` (direct routes) and
    ``scheduled`` (priority levels: every request goes through the scheduler)."""
    topo = _topology(
        tmp_path_factory,
        ["--model-control-mode=explicit", "--load-model=*"],
        {
            "simple": (1, ""),
            "scheduled": (1, "dynamic_batching { priority_levels: 2 default_priority_level: 1 }\n"),
        },
    )
    try:
        topo.wait_ready()
        yield topo
    finally:
        topo.stop()


def workers(topo: Topology, model: str, count: int) -> list:
    """``count`` HTTP clients for a ``Load`` (tests/topology.py) of ``model``."""

    def opener():
        client = httpclient.InferenceServerClient(topo.url)
        return (lambda n: infer(client, httpclient, model, n)), client.close

    return [(model, opener)] * count


def infer(client, module, model: str, base: int) -> None:
    """One request; its outputs checked against the inputs (add and sub)."""
    a = np.arange(base, base + 16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    inputs = [module.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer(model, inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def executions(topo: Topology, model: str, since: int = 0) -> dict[int, set[int]]:
    """pid of each host -> the instances it executed ``model`` on, in the log after
    offset ``since``."""
    seen: dict[int, set[int]] = defaultdict(set)
    for pid, name, instance, _ in EXECUTE.findall(topo.log()[since:]):
        if name == model:
            seen[int(pid)].add(int(instance))
    return dict(seen)


def serve_until(topo: Topology, model: str, pids: set[int], since: int = 0) -> dict[int, set]:
    """Requests one at a time over HTTP and gRPC until each host in ``pids`` executed
    ``model`` (or DEADLINE_S); returns ``executions``."""
    http = httpclient.InferenceServerClient(topo.url)
    grpc = grpcclient.InferenceServerClient(topo.grpc_url)
    deadline = time.monotonic() + DEADLINE_S
    seen: dict[int, set[int]] = {}
    n = 0
    try:
        while time.monotonic() < deadline:
            for client, module in ((http, httpclient), (grpc, grpcclient)):
                infer(client, module, model, n)
                n += 1
            seen = executions(topo, model, since)
            if pids <= set(seen):
                break
            time.sleep(0.02)
    finally:
        http.close()
        grpc.close()
    return seen


def host_pids(topo: Topology) -> set[int]:
    return {s.pid for s in topo.host_services()}


def test_two_hosts_without_shared_memory_serve_one_model(per_host):
    """Both hosts execute requests of a one-instance model: each loaded its own instance
    (distinct indexes), and direct routes alternate between them."""
    pids = host_pids(per_host)
    assert len(pids) == 2
    seen = serve_until(per_host, "simple", pids)
    assert set(seen) == pids, f"executions by host: {seen}\n{per_host.log()[-4000:]}"
    first, second = (seen[p] for p in sorted(pids))
    assert len(first) == len(second) == 1 and first != second  # one instance each


def test_scheduled_batches_use_both_hosts(per_host):
    """A model the scheduler schedules (priority levels) gets batches on both hosts'
    instances under concurrent load."""
    pids = host_pids(per_host)
    seen: dict[int, set[int]] = {}
    with Load(workers(per_host, "scheduled", 4)) as load:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and not load.errors():
            seen = executions(per_host, "scheduled")
            if pids <= set(seen):
                break
            time.sleep(0.1)
    assert not load.errors(), load.errors()
    assert set(seen) == pids, f"executions by host: {seen}"
    lines = [x for x in EXECUTE.findall(per_host.log()) if x[1] == "scheduled"]
    assert {kind for *_, kind in lines} == {"scheduled"}


def test_third_host_joins_under_load_and_serves(per_host):
    """A host added while clients send requests loads the model's instance and serves;
    no request fails meanwhile."""
    seen: dict[int, set[int]] = {}
    with Load(workers(per_host, "simple", 2)) as load:
        time.sleep(0.3)
        before = load.successes()
        since = len(per_host.log())
        third = per_host.add_host("onnxruntime")
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and not load.errors():
            seen = executions(per_host, "simple", since)
            if third.pid in seen:
                break
            time.sleep(0.1)
    assert before > 0 and not load.errors(), load.errors()
    assert third.pid in seen, f"executions by host: {seen}\n{per_host.log()[-4000:]}"
    # Its instance has an index of its own: no other host's.
    others = set().union(*(v for p, v in executions(per_host, "simple").items() if p != third.pid))
    assert seen[third.pid].isdisjoint(others)
    assert len(host_pids(per_host)) == 3


def test_host_leaving_keeps_the_model_ready_and_serving(per_host):
    """A host killed takes its instance with it; the model stays READY and the other
    hosts serve every request."""
    services = per_host.host_services()
    gone = services[0]
    per_host.kill(gone)
    per_host.wait_log(f"pid {gone.pid}) is gone")
    client = httpclient.InferenceServerClient(per_host.url)
    try:
        assert client.is_model_ready("simple")
        assert client.is_model_ready("scheduled")
    finally:
        client.close()
    since = len(per_host.log())
    remaining = host_pids(per_host)
    assert len(remaining) == len(services) - 1
    seen = serve_until(per_host, "simple", remaining, since)
    assert set(seen) == remaining, f"executions by host: {seen}"


def test_reload_replaces_the_instances_on_every_host(per_host):
    """A load with a config override starts the next generation on every host (its
    own indexes) and retires the old one's everywhere: afterwards every host executes on
    new indexes only; an unload leaves the model not ready, a load brings it back."""
    pids = host_pids(per_host)
    old = set().union(*executions(per_host, "simple").values())
    client = httpclient.InferenceServerClient(per_host.url)
    try:
        config = (per_host.repository / "simple" / "config.pbtxt").read_text()
        client.load_model("simple", config=_json_config(config))
        per_host.wait_log("load 0 retired")
        since = len(per_host.log())
        seen = serve_until(per_host, "simple", pids, since)
        assert set(seen) == pids, seen
        new = set().union(*seen.values())
        assert len(new) == 2 and new.isdisjoint(old) and min(new) >= 1000, (old, new)
        client.unload_model("scheduled")
        assert not client.is_model_ready("scheduled")
        client.load_model("scheduled")
        assert client.is_model_ready("scheduled")
    finally:
        client.close()


def _json_config(pbtxt: str) -> str:
    """A config.pbtxt as the JSON a load request's ``config`` carries."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(pbtxt, model_config_pb2.ModelConfig())
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


PID_MODEL = """
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        pid = np.array([os.getpid()], dtype=np.int64)
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("PID", pid)]) for _ in requests
        ]
"""

PID_CONFIG = """
name: "pid"
backend: "python"
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_INT64 dims: [ 1 ] } ]
output [ { name: "PID" data_type: TYPE_INT64 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def test_python_hosts_each_launch_the_instances(tmp_path_factory):
    """Per-host with Python models: each of two Python hosts launches the model's one
    instance process, and requests reach both processes (the model answers its pid)."""
    root = tmp_path_factory.mktemp("scale_python_repo")
    (root / "pid" / "1").mkdir(parents=True)
    (root / "pid" / "config.pbtxt").write_text(PID_CONFIG)
    (root / "pid" / "1" / "model.py").write_text(PID_MODEL)
    topo = Topology(tmp_path_factory.mktemp("scale_python"), root, hosts={"python": 2}, shm=False)
    client = None
    try:
        topo.wait_ready(model="pid")
        topo.wait_log("started instance pid_", count=2)  # one process by each launcher
        client = httpclient.InferenceServerClient(topo.url)
        inp = httpclient.InferInput("IN", [1], "INT64")
        inp.set_data_from_numpy(np.zeros(1, dtype=np.int64))
        pids: set[int] = set()
        deadline = time.monotonic() + DEADLINE_S
        while len(pids) < 2 and time.monotonic() < deadline:
            pids.add(int(client.infer("pid", [inp]).as_numpy("PID")[0]))
        launchers = {s.pid for s in topo.host_services("python")}
        assert len(pids) == 2 and pids.isdisjoint(launchers), (pids, launchers)
    finally:
        if client is not None:
            client.close()
        topo.stop()


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """One ONNX Runtime host, placement spread, ``simple`` with 2 instances in all (both
    on that host until another joins)."""
    root = tmp_path_factory.mktemp("spread_repo")
    _copy_simple(root, "simple", 2)
    topo = Topology(
        tmp_path_factory.mktemp("spread"),
        root,
        hosts={"onnxruntime": 1},
        shm=False,
        scheduler_flags=["--instance-placement=spread", "--log-verbose=1"],
    )
    try:
        topo.wait_ready()
        yield topo
    finally:
        topo.stop()


def test_spread_moves_an_instance_to_a_host_that_joins(spread):
    """Two instances on one host; a second host joins under load: one instance moves to
    it (loaded there first, then unloaded from the first host), no request fails, and
    then each host serves on one instance."""
    (first,) = spread.host_services()
    assert len(serve_until(spread, "simple", {first.pid})[first.pid]) == 2
    with Load(workers(spread, "simple", 2)) as load:
        second = spread.add_host("onnxruntime")
        spread.wait_log("moves off backend host")
        time.sleep(1.5)  # past the move's grace: the instance unloads under load
    assert not load.errors(), load.errors()
    since = len(spread.log())
    seen = serve_until(spread, "simple", {first.pid, second.pid}, since)
    assert set(seen) == {first.pid, second.pid}, seen
    assert all(len(v) == 1 for v in seen.values()), seen  # one instance each
    assert seen[first.pid] != seen[second.pid]


def test_spread_places_a_leaving_hosts_instances_again(spread):
    """A host killed has its instance placed again on the other, which then serves on
    two instances; the model stays READY."""
    gone, stays = spread.host_services()
    before = executions(spread, "simple")[stays.pid]
    since = len(spread.log())
    spread.kill(gone)
    spread.wait_log(f"pid {gone.pid}) is gone")
    deadline = time.monotonic() + DEADLINE_S
    after: dict[int, set[int]] = {}
    while time.monotonic() < deadline and len(after.get(stays.pid, ())) < 2:
        after = serve_until(spread, "simple", {stays.pid}, since)
    client = httpclient.InferenceServerClient(spread.url)
    try:
        assert client.is_model_ready("simple")
    finally:
        client.close()
    assert set(after) == {stays.pid}, after
    # Its own instance and the one placed again (a fresh index).
    assert len(after[stays.pid]) == 2 and not after[stays.pid] <= before, (before, after)


def _instance_pids(topo: Topology) -> set[int]:
    """The Python instance processes the Python hosts launched."""
    pids: set[int] = set()
    for launcher in topo.host_services("python"):
        children = subprocess.run(
            ["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True
        )
        pids |= {int(p) for p in children.stdout.split()}
    return pids


@needs_speed_path("direct routes (scheduled requests of a lost host: test_host_loss)")
def test_direct_request_of_a_lost_host_runs_again_on_another(tmp_path_factory, generator):
    """A stateless request in flight on a direct route whose host dies is sent once more,
    by its frontend, to the model's instance on another host: the client gets the
    answer, not an error."""
    root = tmp_path_factory.mktemp("retry_repo")
    generator.python_slow(root)
    topo = Topology(tmp_path_factory.mktemp("retry"), root, hosts={"python": 2}, shm=False)

    def slow(ms: int):
        client = httpclient.InferenceServerClient(topo.url, network_timeout=30)
        inp = httpclient.InferInput("SLEEP_MS", [1], "INT32")
        inp.set_data_from_numpy(np.array([ms], np.int32))
        try:
            return client.infer("slow", [inp])
        finally:
            client.close()

    try:
        topo.wait_ready(model="slow")
        topo.wait_log("started instance slow_", count=2)
        instances = _instance_pids(topo)
        assert len(instances) == 2, instances
        survivor = int(slow(0).as_numpy("PID")[0])
        (doomed,) = instances - {survivor}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # One request at a time takes turns: this one runs on the other instance.
            future = pool.submit(slow, 1500)
            time.sleep(0.5)
            os.kill(doomed, signal.SIGKILL)
            result = future.result(timeout=15)
        assert int(result.as_numpy("PID")[0]) == survivor
        assert int(result.as_numpy("SLEPT_MS")[0]) == 1500
        assert "was lost; sent again to" in topo.log()
    finally:
        topo.stop()
