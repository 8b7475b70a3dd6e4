"""Idle memory: each process of ``despina serve`` loads what it uses and nothing else.
A Python instance process holds numpy and the Python backend, not protobuf, gRPC or
ZeroMQ; it is forked from the launcher, which has imported those already, and gets its
config as Triton's JSON; the supervisor runs no event loop and reads configs in a
forked child. The scheduler and the frontends load pyzmq only when told to speak
ZeroMQ; a frontend loads gRPC core only for TLS, compression or keepalive settings, and
aiohttp only when DESPINA_HTTP_TRANSPORT=aiohttp asks for it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import textwrap
import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, DespinaServer

HEAVY = ("google.protobuf", "grpc", "zmq", "tritonclient", "aiohttp", "onnxruntime", "torch")

MODEL = f"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

HEAVY = {HEAVY!r}


class TritonPythonModel:
    def initialize(self, args):
        self.config = args["model_config"]

    def execute(self, requests):
        seen = {{
            "loaded": [m for m in HEAVY if m in sys.modules],
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "config": self.config,
        }}
        out = np.array([json.dumps(seen).encode()], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("SEEN", out)]) for _ in requests]
"""

CONFIG = """
name: "footprint"
backend: "python"
max_batch_size: 0
input [ {{ name: "IN" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "SEEN" data_type: TYPE_STRING dims: [ 1 ] }} ]
instance_group [ {{ count: {count} kind: KIND_CPU }} ]
parameters {{ key: "greeting" value {{ string_value: "hello" }} }}
"""

# Shared libraries that mark a package as loaded in a process (its /proc/PID/maps).
LIBRARIES = {
    "protobuf": "_message.abi3.so",
    "grpc": "cygrpc",
    "zmq": "_zmq.",
    "aiohttp": "_http_parser",
    "onnxruntime": "onnxruntime",
    "torch": "libtorch",
    "uvloop": "uvloop/loop.",
    "numpy": "_multiarray_umath",
}


def loaded_libraries(pid: int) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {name for name, marker in LIBRARIES.items() if marker in maps}


def ask(url: str) -> dict:
    client = httpclient.InferenceServerClient(url)
    inp = httpclient.InferInput("IN", [1], "INT32")
    inp.set_data_from_numpy(np.array([1], np.int32))
    result = client.infer("footprint", [inp])
    client.close()
    return json.loads(result.as_numpy("SEEN")[0])


def test_each_process_loads_only_what_it_uses(tmp_path):
    repo = tmp_path / "repo"
    (repo / "footprint" / "1").mkdir(parents=True)
    (repo / "footprint" / "config.pbtxt").write_text(textwrap.dedent(CONFIG.format(count=2)))
    (repo / "footprint" / "1" / "model.py").write_text(textwrap.dedent(MODEL))
    shutil.copytree(SHIPPED_REPOSITORY / "simple", repo / "simple")  # an ONNX Runtime host too
    srv = DespinaServer(repo, tmp_path / "serve.log").start()
    try:
        seen = ask(srv.url)
        assert seen["loaded"] == []
        # The config arrives as Triton's JSON, the same document GET .../config returns.
        config = json.loads(seen["config"])
        client = httpclient.InferenceServerClient(srv.url)
        assert config == client.get_model_config("footprint")
        client.close()
        assert config["parameters"]["greeting"] == {"string_value": "hello"}

        python = srv.child_pids("--framework python")
        assert seen["pid"] in python and seen["ppid"] in python  # forked by the launcher
        instances = [pid for pid in python if pid != seen["ppid"]]
        assert len(instances) == 2
        launcher = seen["ppid"]
        assert loaded_libraries(launcher) == {"numpy", "uvloop"}
        for pid in instances:
            assert loaded_libraries(pid) == {"numpy", "uvloop"}
        assert loaded_libraries(srv.proc.pid) == set()  # the supervisor
        (scheduler,) = srv.child_pids("despina.services.scheduler")
        # No frontend speaks ZeroMQ by default: neither side loads pyzmq.
        assert loaded_libraries(scheduler) == {"protobuf", "uvloop"}
        (onnx,) = srv.child_pids("--framework onnxruntime")
        assert not loaded_libraries(onnx) & {"grpc", "aiohttp", "zmq", "torch"}
        (frontend,) = srv.child_pids("despina.services.frontend")
        # HTTP and plaintext gRPC run on the lean transports: neither aiohttp nor gRPC
        # core in the frontend.
        assert loaded_libraries(frontend) == {"protobuf", "numpy", "uvloop"}
    finally:
        assert srv.stop() == 0


def test_instance_restarted_after_a_crash_is_forked_again(tmp_path):
    repo = tmp_path / "repo"
    (repo / "footprint" / "1").mkdir(parents=True)
    (repo / "footprint" / "config.pbtxt").write_text(textwrap.dedent(CONFIG.format(count=1)))
    (repo / "footprint" / "1" / "model.py").write_text(textwrap.dedent(MODEL))
    srv = DespinaServer(repo, tmp_path / "serve.log").start()
    try:
        first = ask(srv.url)
        os.kill(first["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            try:
                again = ask(srv.url)
                break
            except InferenceServerException:
                assert time.monotonic() < deadline, srv.log()
                time.sleep(0.1)
        assert again["pid"] != first["pid"] and again["ppid"] == first["ppid"]
        assert again["loaded"] == [] and again["config"] == first["config"]
    finally:
        assert srv.stop() == 0


def test_zeromq_transport_when_asked_for(tmp_path):
    """``--scheduler-transport=zmq``: frontends reach the scheduler over ZeroMQ, and
    only then do both load pyzmq."""
    repo = tmp_path / "repo"
    shutil.copytree(SHIPPED_REPOSITORY / "simple", repo / "simple")
    srv = DespinaServer(repo, tmp_path / "serve.log", ["--scheduler-transport=zmq"]).start()
    try:
        client = httpclient.InferenceServerClient(srv.url)
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        inputs = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        for inp in inputs:
            inp.set_data_from_numpy(a)
        np.testing.assert_array_equal(client.infer("simple", inputs).as_numpy("OUTPUT0"), 2 * a)
        client.close()
        (scheduler,) = srv.child_pids("despina.services.scheduler")
        (frontend,) = srv.child_pids("despina.services.frontend")
        assert "zmq" in loaded_libraries(scheduler)
        assert "zmq" in loaded_libraries(frontend)
        assert "scheduler listening at ipc://" in srv.log()
    finally:
        assert srv.stop() == 0
