"""Each service started on its own with TCP endpoints (what compose runs), the
tritonserver flag syntax, and the packaging of the ``despina`` import package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import ROOT, SHIPPED_REPOSITORY, DespinaServer, free_port, http_status


def spawn(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "despina.services.cli", *args], stdout=log, stderr=subprocess.STDOUT
    )


class Services:
    """The services started one by one over TCP, as compose runs them."""

    def __init__(self, tmp_path, repo, advertise: str | None = None, zmq: bool = False) -> None:
        ports = [free_port() for _ in range(4)]
        scheduler = f"tcp://127.0.0.1:{ports[0]}"
        hosts = f"tcp://127.0.0.1:{ports[1]}"
        self.url = f"127.0.0.1:{ports[3]}"
        self.log_path = tmp_path / "services.log"
        self.log = open(self.log_path, "wb")
        frontend = [
            "frontend",
            "--scheduler",
            f"zmq+{scheduler}" if zmq else hosts,
            "--reply-endpoint",
            f"tcp://127.0.0.1:{ports[2]}",
            "--http-address",
            "127.0.0.1",
            "--http-port",
            str(ports[3]),
            f"--grpc-port={free_port()}",
        ]
        if advertise:
            frontend += ["--advertise-endpoint", advertise]
        self.procs = [
            spawn(
                [
                    "scheduler",
                    f"--model-repository={repo}",
                    "--endpoint",
                    scheduler,
                    "--host-endpoint",
                    hosts,
                ],
                self.log,
            ),
            spawn(["backend-host", "--framework", "onnxruntime", "--scheduler", hosts], self.log),
            spawn(["backend-host", "--framework=python", f"--scheduler={hosts}"], self.log),
            spawn(frontend, self.log),
        ]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if http_status(f"http://{self.url}/v2/health/ready") == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail(self.log_path.read_text())

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.log.close()


def test_unreachable_reply_endpoint_is_an_error_not_a_hang(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(SHIPPED_REPOSITORY / "simple", repo / "simple")
    services = Services(tmp_path, repo, advertise=f"tcp://127.0.0.1:{free_port()}")
    try:
        services.wait_ready()
        client = httpclient.InferenceServerClient(services.url, network_timeout=30)
        a = np.ones((1, 16), np.int32)
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            inp = httpclient.InferInput(name, [1, 16], "INT32")
            inp.set_data_from_numpy(a)
            inputs.append(inp)
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            client.infer("simple", inputs)
        assert time.monotonic() - started < 10
        assert info.value.status() == "503"
        assert "could not send the reply to this frontend" in info.value.message()
        assert "advertised reply endpoint" in info.value.message()
        client.close()
    finally:
        services.stop()


@pytest.mark.parametrize("zmq", [False, True], ids=["stream", "zeromq"])
def test_services_started_separately_over_tcp(tmp_path, zmq):
    repo = tmp_path / "repo"
    repo.mkdir()
    for model in ("simple", "add_sub"):
        shutil.copytree(SHIPPED_REPOSITORY / model, repo / model)
    services = Services(tmp_path, repo, zmq=zmq)
    try:
        services.wait_ready()
        url = services.url
        client = httpclient.InferenceServerClient(url)
        for model, dtype in (("simple", np.int32), ("add_sub", np.float32)):
            a = np.arange(16, dtype=dtype).reshape(1, 16)
            inputs = []
            for name in ("INPUT0", "INPUT1"):
                inp = httpclient.InferInput(name, [1, 16], "INT32" if dtype is np.int32 else "FP32")
                inp.set_data_from_numpy(a, binary_data=True)
                inputs.append(inp)
            result = client.infer(model, inputs)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)
        client.close()
    finally:
        services.stop()


def test_tritonserver_flags_are_accepted(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(SHIPPED_REPOSITORY / "simple", repo / "simple")
    srv = DespinaServer(
        repo,
        tmp_path / "serve.log",
        [
            "--log-verbose=1",
            "--strict-model-config=false",
            "--model-control-mode",
            "none",
            "--backend-config=python,shm-default-byte-size=1048576",
            f"--grpc-port={free_port()}",
            f"--metrics-port={free_port()}",
            "--allow-client-shm",
            "--exit-timeout-secs=5",
        ],
    ).start()
    try:
        assert http_status(f"http://{srv.url}/v2/models/simple/ready") == 200
        log = srv.log()
        assert (
            "--backend-config is accepted for compatibility with tritonserver but not supported yet"
            in log
        )
        assert "--strict-model-config is accepted" not in log  # it acts (auto-complete)
        assert "--model-control-mode is accepted" not in log  # it acts (model_control.py)
        assert "Started HTTPService at 0.0.0.0:" in log
        assert "Despina is ready" in log
    finally:
        assert srv.stop() == 0


def test_bad_flag_and_missing_repository_fail_clearly(tmp_path):
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "despina.services.cli",
            "serve",
            "--model-repository",
            str(tmp_path),
            "--no-such-flag",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in bad.stderr
    srv = DespinaServer(tmp_path / "does-not-exist", tmp_path / "serve.log").start(wait_ready=False)
    try:
        assert srv.proc.wait(30) == 1
        assert "does not exist or is not a folder" in srv.log()
    finally:
        srv.stop()


def test_port_in_use_fails_clearly(tmp_path, server):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(SHIPPED_REPOSITORY / "simple", repo / "simple")
    srv = DespinaServer(repo, tmp_path / "serve.log")
    srv.http_port = server.http_port
    srv.start(wait_ready=False)
    try:
        assert srv.proc.wait(30) == 1
        assert "could not listen for HTTP" in srv.log()
    finally:
        srv.stop()


def test_wheel_installs_one_import_package(tmp_path):
    """The wheel holds ``despina/...`` only: no top-level ``common`` or ``services``."""
    out = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = out.glob("despina-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("despina-")}
    assert tops == {"despina"}, tops
    assert "despina/services/cli.py" in names
    assert "despina/common/messages.py" in names
    assert "despina/services/backend_host/backends/python/triton_python_backend_utils.py" in names


def test_editable_install_exposes_only_despina(tmp_path):
    """Only ``despina`` is importable; the card's folder names stay out of sys.path."""
    code = (
        "import importlib.util, despina.common.messages, despina.services.cli;"
        "print(importlib.util.find_spec('common'), importlib.util.find_spec('services'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]
