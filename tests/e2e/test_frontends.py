"""Two frontends at once (#17): whichever frontend a client reaches, the server behaves as
one. Over the services started one by one (tests/topology.py, each frontend on its own
ports so a test picks which one it talks to): inference over HTTP and gRPC through each,
a client shared-memory region registered through one frontend and used through the
other, a model unloaded and loaded through one and seen by the other, statistics that
add up the requests of both. Then ``despina frontend --frontends 2`` (two processes
behind one port, as compose runs them) and ``despina serve --frontends 2``: both
processes join the scheduler with their own reply endpoints and both serve.
(Statistics counted across two frontends of ``serve`` are tests/e2e/test_statistics.py's.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from topology import Topology

from conftest import SHIPPED_REPOSITORY, DespinaServer, free_port, free_port_run

DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Scheduler (explicit model control, every model loaded, client shm allowed), one
    ONNX Runtime host, two frontends on their own ports, statistics on."""
    root = tmp_path_factory.mktemp("frontends_repo")
    for model in ("simple", "identity_fp32"):
        shutil.copytree(SHIPPED_REPOSITORY / model, root / model)
    topo = Topology(
        tmp_path_factory.mktemp("frontends"),
        root,
        frontends=2,
        scheduler_flags=[
            "--model-control-mode=explicit",
            "--load-model=*",
            "--allow-client-shm=true",
        ],
        # One metrics port for both (SO_REUSEPORT): each frontend counts its requests.
        frontend_flags=["--allow-metrics=true", f"--metrics-port={free_port()}", "--reuse-port"],
        env={"DESPINA_STATISTICS": "on"},
    )
    try:
        topo.wait_ready(model="simple")
        yield topo
    finally:
        topo.stop()


def simple_inputs(module, base: int = 0):
    a = np.arange(base, base + 16, dtype=np.int32).reshape(1, 16)
    inputs = [module.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for inp in inputs:
        inp.set_data_from_numpy(a)
    return a, inputs


def infer_simple(client, module, base: int = 0) -> None:
    a, inputs = simple_inputs(module, base)
    result = client.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), 0 * a)


def clients(frontend):
    return (
        httpclient.InferenceServerClient(frontend.http),
        grpcclient.InferenceServerClient(frontend.grpc),
    )


def test_inference_through_each_over_http_and_grpc(two):
    """Each frontend answers inferences over both protocols, with the right values."""
    assert len({f.service.pid for f in two.frontend_list}) == 2
    for i, frontend in enumerate(two.frontend_list):
        http, grpc = clients(frontend)
        try:
            infer_simple(http, httpclient, base=10 * i)
            infer_simple(grpc, grpcclient, base=10 * i + 5)
            assert http.is_server_ready() and grpc.is_server_ready()
        finally:
            http.close()
            grpc.close()


def test_region_registered_through_one_used_through_the_other(two, regions):
    """A system shared-memory region registered over HTTP on frontend 0 serves as input
    and output over gRPC on frontend 1, is listed by both, and its unregistration
    through frontend 1 is seen by frontend 0."""
    size = 64 * 1024 * 4  # 256 KiB
    data = np.random.default_rng(3).random((1, size // 4), dtype=np.float32)
    in_name, in_key, in_handle = regions(size)
    out_name, out_key, out_handle = regions(size)
    shm.set_shared_memory_region(in_handle, [data])
    http0 = httpclient.InferenceServerClient(two.frontend_list[0].http)
    grpc1 = grpcclient.InferenceServerClient(two.frontend_list[1].grpc)
    try:
        http0.register_system_shared_memory(in_name, in_key, size)
        http0.register_system_shared_memory(out_name, out_key, size)
        listed = grpc1.get_system_shared_memory_status(as_json=True)["regions"]
        assert {in_name, out_name} <= set(listed)
        assert int(listed[in_name]["byte_size"]) == size
        inp = grpcclient.InferInput("INPUT0", [1, size // 4], "FP32")
        inp.set_shared_memory(in_name, size)
        out = grpcclient.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory(out_name, size)
        grpc1.infer("identity_fp32", [inp], outputs=[out])
        got = shm.get_contents_as_numpy(out_handle, np.float32, [1, size // 4])
        np.testing.assert_array_equal(got, data)
        grpc1.unregister_system_shared_memory(in_name)
        grpc1.unregister_system_shared_memory(out_name)
        assert not {in_name, out_name} & set(
            r["name"] for r in http0.get_system_shared_memory_status()
        )
    finally:
        for name in (in_name, out_name):
            try:
                http0.unregister_system_shared_memory(name)
            except Exception:  # noqa: BLE001 - already unregistered on the passing path
                pass
        http0.close()
        grpc1.close()


def wait_ready_state(client, model: str, ready: bool) -> bool:
    """Whether ``model``'s readiness reaches ``ready`` within the deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if client.is_model_ready(model) == ready:
            return True
        time.sleep(0.05)
    return client.is_model_ready(model) == ready


def test_model_control_through_one_seen_by_the_other(two):
    """Unloaded over HTTP on frontend 0: frontend 1 says not ready (HTTP and gRPC), its
    index says UNAVAILABLE and an inference there fails; loaded again over gRPC on
    frontend 1: frontend 0 serves it."""
    http0 = httpclient.InferenceServerClient(two.frontend_list[0].http)
    http1 = httpclient.InferenceServerClient(two.frontend_list[1].http)
    grpc1 = grpcclient.InferenceServerClient(two.frontend_list[1].grpc)
    try:
        http0.unload_model("identity_fp32")
        assert wait_ready_state(grpc1, "identity_fp32", False)
        assert not http1.is_model_ready("identity_fp32")
        index = {m["name"]: m for m in http1.get_model_repository_index()}
        assert index["identity_fp32"]["state"] == "UNAVAILABLE"
        inp = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        with pytest.raises(Exception, match="identity_fp32"):
            http1.infer("identity_fp32", [inp])
        grpc1.load_model("identity_fp32")
        assert wait_ready_state(http0, "identity_fp32", True)
        result = http0.infer("identity_fp32", [inp])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.ones((1, 4), np.float32))
    finally:
        http0.close()
        http1.close()
        grpc1.close()


def test_statistics_add_up_both_frontends(two):
    """Requests through frontend 0 and frontend 1 are counted once each in the
    statistics either frontend answers (the scheduler adds up every process)."""
    http0 = httpclient.InferenceServerClient(two.frontend_list[0].http)
    grpc1 = grpcclient.InferenceServerClient(two.frontend_list[1].grpc)

    def success(client) -> int:
        if isinstance(client, grpcclient.InferenceServerClient):
            stats = client.get_inference_statistics("simple", as_json=True)
        else:
            stats = client.get_inference_statistics("simple")
        return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))

    try:
        before = success(http0)
        for i in range(3):
            infer_simple(http0, httpclient, base=i)
            infer_simple(grpc1, grpcclient, base=i)
        want = before + 6
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and success(grpc1) < want:
            time.sleep(0.05)
        assert success(grpc1) == want
        assert success(http0) == want
    finally:
        http0.close()
        grpc1.close()


def joined_endpoints(log: str) -> list[str]:
    return re.findall(r"frontend joined; replies go to (\S+)", log)


def infer_on_new_connections(make_clients, count: int = 8) -> None:
    """``count`` inferences of ``simple`` over HTTP and gRPC, each pair on new
    connections (``make_clients()``: an HTTP and a gRPC client): SO_REUSEPORT may send
    each to any of the processes sharing the ports."""
    for i in range(count):
        http, grpc = make_clients()
        try:
            infer_simple(http, httpclient, base=i)
            infer_simple(grpc, grpcclient, base=i)
        finally:
            http.close()
            grpc.close()


def test_frontend_processes_option(two):
    """``despina frontend --frontends 2`` on one HTTP/gRPC port pair: two processes join
    the scheduler, on the reply port and the next one, and both serve (new connections,
    spread by the kernel, until each process's pid shows in the scheduler's log of
    joins and every request is answered right)."""
    before = len(joined_endpoints(two.log()))
    reply_port = free_port_run(2)
    added = two.add_frontend(f"--reply-endpoint=tcp://127.0.0.1:{reply_port}", "--frontends=2")
    two.wait_log("frontend joined", count=before + 2)
    new = joined_endpoints(two.log())[before:]
    assert sorted(new) == [
        f"tcp://127.0.0.1:{reply_port}",
        f"tcp://127.0.0.1:{reply_port + 1}",
    ]
    started = re.search(r"started 2 frontends \(pids (\d+), (\d+)\)", two.log())
    assert started is not None
    pids = {int(started.group(1)), int(started.group(2))}
    assert len(pids) == 2 and added.service.pid not in pids
    two.wait_ready(model="simple")
    infer_on_new_connections(lambda: clients(added))
    # Both processes stop with their parent.
    two.kill(added.service)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def test_frontend_processes_on_any_free_reply_port(two):
    """``--reply-endpoint=tcp://127.0.0.1:0`` with ``--frontends 2``: each process binds a
    port of its own that the kernel picks, tells the scheduler that port (not 0), and
    both serve."""
    before = len(joined_endpoints(two.log()))
    added = two.add_frontend("--reply-endpoint=tcp://127.0.0.1:0", "--frontends=2")
    two.wait_log("frontend joined", count=before + 2)
    new = joined_endpoints(two.log())[before:]
    ports = {int(e.rpartition(":")[2]) for e in new}
    assert len(new) == 2 and len(ports) == 2 and 0 not in ports, new
    two.wait_ready(model="simple")
    infer_on_new_connections(lambda: clients(added))
    two.kill(added.service)


def test_advertised_reply_port_zero_is_refused():
    """``--advertise-endpoint`` names the port backend hosts reach: 0 there cannot be
    reached, so the frontend stops at once with EX_CONFIG (78) and says why, before it
    binds or connects anything."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "despina.services.frontend",
            f"--scheduler=tcp://127.0.0.1:{free_port()}",
            "--reply-endpoint=tcp://127.0.0.1:0",
            "--advertise-endpoint=tcp://frontend:0",
            f"--http-port={free_port()}",
            f"--grpc-port={free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert proc.returncode == 78, proc.stderr
    assert "--advertise-endpoint needs the port backend hosts reach, not 0" in proc.stderr


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left to init counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_serve_with_two_frontends(tmp_path):
    """``despina serve --frontends 2 --backend-hosts onnxruntime=2``: two frontend
    processes, each joined with its own reply endpoint, two ONNX Runtime hosts joined,
    and the shared ports answer HTTP and gRPC on new connections."""
    repo = tmp_path / "repo"
    shutil.copytree(SHIPPED_REPOSITORY / "simple", repo / "simple")
    srv = DespinaServer(
        repo, tmp_path / "serve.log", ["--frontends", "2", "--backend-hosts", "onnxruntime=2"]
    ).start()
    try:
        pids = srv.child_pids("despina.services.frontend")
        assert len(pids) == 2
        hosts = srv.child_pids("despina.services.backend_host")
        assert len(hosts) == 2
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and srv.log().count("(onnxruntime, pid") < 2:
            time.sleep(0.05)
        joined = set(map(int, re.findall(r"\(onnxruntime, pid (\d+)\) joined", srv.log())))
        assert joined == set(hosts)
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and len(joined_endpoints(srv.log())) < 2:
            time.sleep(0.05)
        assert len(set(joined_endpoints(srv.log()))) == 2
        infer_on_new_connections(
            lambda: (
                httpclient.InferenceServerClient(srv.url),
                grpcclient.InferenceServerClient(srv.grpc_url),
            ),
            4,
        )
    finally:
        assert srv.stop() == 0
