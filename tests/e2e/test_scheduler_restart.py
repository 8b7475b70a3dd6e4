"""A scheduler restart (issue #17): the scheduler is SIGKILLed under load and a new one
starts on the same endpoints (tests/topology.py), or ``despina serve`` restarts it.

Frontends and backend hosts reconnect; every request either succeeds or fails with
UNAVAILABLE within a bound (none hangs) and requests succeed again within seconds; a
client shared-memory region registered before is usable after without registering again
(the frontend registers it again); a model loaded by the API in explicit mode, with a
config override, is READY again (the scheduler's ``--state-dir`` state file).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import time
import uuid

import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from topology import Load, Topology
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, DespinaServer

# A request that waits for the link (5 s at most, scheduler_client.LINK_WAIT_S) and is
# then sent: answered well within this, or it hung.
REQUEST_BOUND_S = 12.0
# From the kill to requests succeeding again.
RECOVERY_S = 15.0
UNAVAILABLE = {"503", "StatusCode.UNAVAILABLE"}
A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.full((1, 16), 3, dtype=np.int32)


def _repository(root):
    """``simple`` (loaded at start) and ``late`` (a copy, loaded by the API)."""
    shutil.copytree(SHIPPED_REPOSITORY / "simple", root / "simple")
    shutil.copytree(SHIPPED_REPOSITORY / "simple", root / "late")
    config = (root / "late" / "config.pbtxt").read_text()
    (root / "late" / "config.pbtxt").write_text(config.replace('"simple"', '"late"'))
    return root


def infer(client, module, model: str = "simple") -> None:
    inputs = [module.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(A)
    inputs[1].set_data_from_numpy(B)
    result = client.infer(model, inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)


def infer_from_region(client, region: str, model: str = "simple") -> None:
    """INPUT0 and INPUT1 read from ``region`` (A at 0, B at 64), outputs checked."""
    inputs = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_shared_memory(region, 64, 0)
    inputs[1].set_shared_memory(region, 64, 64)
    result = client.infer(model, inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), A - B)


def make_region(made: list) -> str:
    """A system shared-memory region holding A then B, made as a user makes one."""
    name = f"despina_restart_{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region(name, "/" + name, 128)
    shm.set_shared_memory_region(handle, [A, B])
    made.append(handle)
    return name


def late_config(client) -> str:
    """``late``'s config as JSON with a parameter added: the load-time override."""
    config = client.get_model_config("simple")
    config["name"] = "late"
    config["parameters"] = {"restored": {"string_value": "yes"}}
    return orjson.dumps(config).decode()


def wait_for(check, timeout: float, what: str, log) -> float:
    """Call ``check`` until it returns without raising; the seconds it took."""
    start = time.monotonic()
    last: BaseException | None = None
    while time.monotonic() < start + timeout:
        try:
            check()
            return time.monotonic() - start
        except Exception as exc:  # noqa: BLE001 - retried, reported at the deadline
            last = exc
            time.sleep(0.05)
    pytest.fail(f"{what} not within {timeout} s (last: {last}):\n{log()[-6000:]}")


def workers(url: str, grpc_url: str, region: str) -> list:
    """Clients for a ``Load`` (tests/topology.py): two over HTTP, one over gRPC (direct
    routes: straight to the host), one naming ``region`` (through the scheduler, which
    resolves regions); a failed request waits 20 ms before the next."""

    def opener(kind: str):
        if kind == "grpc":
            client = grpcclient.InferenceServerClient(grpc_url)

            def send(_n: int) -> None:
                inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
                inputs[0].set_data_from_numpy(A)
                inputs[1].set_data_from_numpy(B)
                result = client.infer("simple", inputs, client_timeout=60)
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), A + B)

            return send, client.close
        http = httpclient.InferenceServerClient(url, network_timeout=60)
        if kind == "region":
            return (lambda _n: infer_from_region(http, region)), http.close
        return (lambda _n: infer(http, httpclient)), http.close

    return [(kind, functools.partial(opener, kind)) for kind in ("http", "http", "grpc", "region")]


def status_of(error: BaseException | None) -> str | None:
    """An outcome's status: None (a success), the server's, or the exception's type (a
    timeout or a broken reply)."""
    if error is None:
        return None
    if isinstance(error, InferenceServerException):
        return str(error.status())
    return type(error).__name__


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """A topology in explicit mode with a state folder: ``late`` loaded by the API with a
    config override, three regions registered (one unregistered and one destroyed again
    before the restart), then the scheduler killed and started again under load."""
    tmp = tmp_path_factory.mktemp("restart")
    repo = _repository(tmp_path_factory.mktemp("restart_repo"))
    topo = Topology(
        tmp,
        repo,
        scheduler_flags=[
            "--model-control-mode=explicit",
            "--load-model=simple",
            "--allow-client-shm=true",
            f"--state-dir={tmp / 'state'}",
        ],
    )
    made: list = []
    client = httpclient.InferenceServerClient(topo.url)
    try:
        topo.wait_ready(model="simple")
        client.load_model("late", config=late_config(client))
        kept, dropped, destroyed = make_region(made), make_region(made), make_region(made)
        for name in (kept, dropped, destroyed):
            client.register_system_shared_memory(name, "/" + name, 128)
        client.unregister_system_shared_memory(dropped)
        shm.destroy_shared_memory_region(made.pop())  # gone before the restart
        infer_from_region(client, kept)
        load = Load(
            workers(topo.url, topo.grpc_url, kept), pause_s=0.02, join_s=6 * REQUEST_BOUND_S
        )
        with load:
            wait_for(lambda: len(load.outcomes) > 20 or 1 / 0, 20, "load running", topo.log)
            killed_at = time.monotonic()
            topo.restart_scheduler()
            probes = []  # readiness probes meanwhile: (answer, seconds)
            while len(probes) < 10:
                t0 = time.monotonic()
                probes.append((client.is_server_ready(), time.monotonic() - t0))
            # through the new scheduler: the region registered again, the model placed again
            recovery = wait_for(
                lambda: infer_from_region(client, kept), RECOVERY_S, "a request", topo.log
            )
            time.sleep(1.0)  # the load goes on after the recovery
        yield {
            "topo": topo,
            "client": client,
            "kept": kept,
            "dropped": dropped,
            "destroyed": destroyed,
            "outcomes": load.snapshot(),
            "killed_at": killed_at,
            "recovery": recovery,
            "probes": probes,
        }
    finally:
        client.close()
        topo.stop()
        for handle in made:
            shm.destroy_shared_memory_region(handle)


def test_requests_under_load_succeed_or_fail_unavailable(restarted):
    """Every request of the load either succeeded or failed with UNAVAILABLE, none took
    longer than the bound, and requests succeeded again within seconds of the kill."""
    outcomes = restarted["outcomes"]
    killed_at = restarted["killed_at"]
    assert outcomes, "the load sent nothing"
    other = [o for o in outcomes if status_of(o.error) not in (None, *UNAVAILABLE)]
    assert not other, f"errors other than UNAVAILABLE: {other[:5]}"
    slow = [o for o in outcomes if o.seconds > REQUEST_BOUND_S]
    assert not slow, f"requests that took longer than {REQUEST_BOUND_S} s: {slow[:5]}"
    after = [o for o in outcomes if o.start > killed_at + restarted["recovery"] and not o.error]
    assert after, "no request of the load succeeded after the recovery"
    before = [o for o in outcomes if o.start < killed_at and o.error is None]
    assert len(before) > 20
    assert restarted["recovery"] < RECOVERY_S
    failed = [o for o in outcomes if o.error is not None]
    print(f"{len(outcomes)} requests, {len(failed)} failed, recovery {restarted['recovery']:.2f} s")
    for o in failed:
        print(f"  at {o.start - killed_at:+.2f} s took {o.seconds:.2f} s: {o.error}")
    for o in failed:
        message = o.error.message() if isinstance(o.error, InferenceServerException) else ""
        # in flight at the kill: sent to the scheduler, or straight to a host that had
        # just dropped its instances (it lost the scheduler first)
        assert "scheduler" in message or "not loaded on this host" in message, message


def test_readiness_answers_at_once_during_restart(restarted):
    """A readiness probe while the scheduler is away or not ready yet answers (not ready,
    or ready once it is) at once instead of waiting for it."""
    probes = restarted["probes"]
    assert max(took for _, took in probes) < 1.0, probes
    assert not probes[0][0], probes  # just killed: not ready


def test_registered_region_works_after_restart(restarted):
    """The region registered before the restart serves a request without registering
    again and is in the status; the one unregistered before is not, and the one whose
    object was destroyed is forgotten (logged)."""
    client = restarted["client"]
    topo = restarted["topo"]
    kept = restarted["kept"]
    infer_from_region(client, kept)
    status = {r["name"]: r for r in client.get_system_shared_memory_status()}
    assert kept in status and status[kept]["key"] == "/" + kept
    assert int(status[kept]["byte_size"]) == 128
    assert restarted["dropped"] not in status
    assert restarted["destroyed"] not in status
    topo.wait_log(f"shared memory region '{restarted['destroyed']}' could not be registered again")
    grpc = grpcclient.InferenceServerClient(topo.grpc_url)
    try:
        names = [r.name for r in grpc.get_system_shared_memory_status().regions.values()]
        assert kept in names
    finally:
        grpc.close()


def test_model_loaded_by_api_is_ready_after_restart(restarted):
    """``late`` (loaded by the API, with a config override) is READY after the restart
    with its override, and serves."""
    client = restarted["client"]
    topo = restarted["topo"]
    wait_for(lambda: client.is_model_ready("late") or 1 / 0, 20, "late ready", topo.log)
    config = client.get_model_config("late")
    assert config["parameters"]["restored"]["string_value"] == "yes"
    infer(client, httpclient, "late")
    index = {(e["name"], e.get("state")) for e in client.get_model_repository_index()}
    assert ("late", "READY") in index and ("simple", "READY") in index


def test_model_unloaded_by_api_stays_unloaded(restarted):
    """An unload is remembered as well: after a second restart the model is not loaded."""
    client = restarted["client"]
    topo = restarted["topo"]
    wait_for(lambda: client.is_model_ready("late") or 1 / 0, 20, "late ready", topo.log)
    client.unload_model("late")
    topo.restart_scheduler()
    wait_for(lambda: infer(client, httpclient), RECOVERY_S, "a request after it", topo.log)
    assert not client.is_model_ready("late")
    infer_from_region(client, restarted["kept"])


@pytest.mark.parametrize("transport", ["stream", "zmq"])
def test_despina_serve_restarts_its_scheduler(tmp_path_factory, transport):
    """``despina serve``: the scheduler child SIGKILLed is restarted by the supervisor;
    the model loaded by the API, the region registered and the logging and trace
    settings changed are back without the client doing anything, over either link from
    the frontend to the scheduler (a ZeroMQ one reconnects inside libzmq: its socket
    monitor tells the frontend, which says hello and registers the region again)."""
    repo = _repository(tmp_path_factory.mktemp("serve_restart_repo"))
    server = DespinaServer(
        repo,
        tmp_path_factory.mktemp("serve_restart") / "serve.log",
        [
            "--model-control-mode=explicit",
            "--load-model=simple",
            "--allow-client-shm=true",
            f"--scheduler-transport={transport}",
        ],
    ).start()
    made: list = []
    client = httpclient.InferenceServerClient(server.url)
    try:
        client.load_model("late")
        region = make_region(made)
        client.register_system_shared_memory(region, "/" + region, 128)
        client.update_log_settings({"log_verbose_level": 1, "log_format": "ISO8601"})
        client.update_trace_settings("simple", {"trace_rate": "7"})
        (pid,) = server.child_pids("despina.services.scheduler")
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: server.child_pids("despina.services.scheduler") not in ([], [pid]) or 1 / 0,
            15,
            "a new scheduler",
            server.log,
        )
        wait_for(lambda: infer(client, httpclient), RECOVERY_S, "a request", server.log)
        wait_for(lambda: client.is_model_ready("late") or 1 / 0, 20, "late ready", server.log)
        infer(client, httpclient, "late")
        infer_from_region(client, region)
        assert "scheduler (pid" in server.log() and "restarting it" in server.log()
        settings = client.get_log_settings()
        assert settings["log_verbose_level"] == 1 and settings["log_format"] == "ISO8601"
        assert client.get_trace_settings("simple")["trace_rate"] == "7"
        assert client.get_trace_settings()["trace_rate"] == "1000"  # the global: Triton's
    finally:
        client.close()
        server.stop()
        for handle in made:
            shm.destroy_shared_memory_region(handle)
