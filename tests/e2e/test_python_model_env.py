"""What a Python model sees of its process (issue #14): what Triton's stub gives it.

Triton runs a model in ``triton_python_backend_stub``, which embeds Python through
pybind11 with no arguments, so the model sees ``sys.argv == [""]``; the stub is
forked from the server and exec'd through ``bash -c "exec <stub> ..."``, so it runs in the
server's working directory with the server's environment (bash adds only its own
``PWD``/``SHLVL``/``_``); and the stub appends the version folder and the model folder to
``sys.path``. Here real ``despina serve`` processes serve models that record all of that
from inside, and tritonclient reads it back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import DespinaServer

# Set in the server's environment by the fixture: the model must see it unchanged.
SETTING_ENV = "DESPINA_TEST_MODEL_SETTING"
SETTING_VALUE = "from the server's environment: a=1;b='2'"

# Variables a shell or Python may set on its own; none of them comes from Despina.
_SHELL_OWN = {"PWD", "OLDPWD", "SHLVL", "_"}

STUB_VIEW_PY = """\
import argparse
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

# At import, as a script would: the arguments must parse (Triton's stub has none).
IMPORT_ARGV = list(sys.argv)
IMPORT_ARGS = vars(argparse.ArgumentParser().parse_args())


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.dirname(os.path.abspath(__file__))
        self.view = json.dumps(
            {
                "import_argv": IMPORT_ARGV,
                "import_args": IMPORT_ARGS,
                "argv": list(sys.argv),
                "initialize_args": vars(argparse.ArgumentParser().parse_args()),
                "cwd": os.getcwd(),
                "environ": dict(os.environ),
                "version_dir_in_path": here in sys.path,
                "model_dir_in_path": os.path.dirname(here) in sys.path,
                "model_repository": args["model_repository"],
                "model_version": args["model_version"],
            }
        ).encode()

    def execute(self, requests):
        responses = []
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            out = np.array([self.view] * int(n.size), dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("VIEW", out)]))
        return responses
"""

# Triton's own qa models run their checks with ``unittest.main("model", exit=False)``
# inside the server: "model" is imported from the version folder on sys.path, and
# unittest parses sys.argv, which must hold no server flags.
UNITTEST_PY = """\
import json
import sys
import unittest

import numpy as np
import triton_python_backend_utils as pb_utils


class StubArgvTest(unittest.TestCase):
    def test_argv_is_the_stubs(self):
        self.assertEqual(sys.argv, [""])


class TritonPythonModel:
    def initialize(self, args):
        test = unittest.main("model", exit=False)
        self.result = json.dumps(
            {
                "ran": test.result.testsRun,
                "ok": test.result.wasSuccessful(),
                "failures": [text for _, text in test.result.failures + test.result.errors],
            }
        ).encode()

    def execute(self, requests):
        out = np.array([self.result], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("VIEW", out)]) for _ in requests]
"""

_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "IN", data_type: TYPE_INT32, dims: [ 1 ] }} ]
output [ {{ name: "VIEW", data_type: TYPE_STRING, dims: [ 1 ] }} ]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
"""


def _write_model(repo, name: str, source: str) -> None:
    version_dir = repo / name / "1"
    version_dir.mkdir(parents=True)
    compile(source, str(version_dir / "model.py"), "exec")
    (version_dir / "model.py").write_text(source)
    (repo / name / "config.pbtxt").write_text(_CONFIG.format(name=name))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A started ``despina serve`` of both models, run from a working directory of its
    own with SETTING_ENV in its environment; yields (server, its cwd)."""
    repo = tmp_path_factory.mktemp("env-repo")
    _write_model(repo, "stub_view", STUB_VIEW_PY)
    _write_model(repo, "stub_unittest", UNITTEST_PY)
    workdir = tmp_path_factory.mktemp("server-cwd")
    log = tmp_path_factory.mktemp("env-logs") / "serve.log"
    before_cwd = os.getcwd()
    os.environ[SETTING_ENV] = SETTING_VALUE
    os.chdir(workdir)
    try:
        server = DespinaServer(repo, log).start()
    finally:
        os.chdir(before_cwd)
        del os.environ[SETTING_ENV]
    try:
        yield server, str(workdir)
    finally:
        server.stop()


def _view_http(server: DespinaServer, model: str) -> dict:
    with httpclient.InferenceServerClient(server.url) as client:
        inp = httpclient.InferInput("IN", [1], "INT32")
        inp.set_data_from_numpy(np.array([1], dtype=np.int32))
        result = client.infer(model, [inp])
    out = result.as_numpy("VIEW")
    assert out is not None and out.shape == (1,)
    return json.loads(out[0])


def _view_grpc(server: DespinaServer, model: str) -> dict:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        inp = grpcclient.InferInput("IN", [1], "INT32")
        inp.set_data_from_numpy(np.array([1], dtype=np.int32))
        result = client.infer(model, [inp])
    out = result.as_numpy("VIEW")
    assert out is not None and out.shape == (1,)
    return json.loads(out[0])


def test_model_sees_a_clean_argv(served):
    """sys.argv is [""] at import and in initialize (no backend-host flags), so an
    argparse parser with no arguments parses; read back over HTTP and gRPC."""
    server, _ = served
    for view in (_view_http(server, "stub_view"), _view_grpc(server, "stub_view")):
        assert view["import_argv"] == [""]
        assert view["argv"] == [""]
        assert view["import_args"] == {}
        assert view["initialize_args"] == {}


def test_model_runs_in_the_servers_working_directory(served):
    """As Triton's stub (forked, no chdir): the server's cwd, not the model folder."""
    server, workdir = served
    view = _view_http(server, "stub_view")
    assert os.path.realpath(view["cwd"]) == os.path.realpath(workdir)
    assert os.path.realpath(view["cwd"]) != os.path.realpath(server.repository / "stub_view")


def test_model_gets_the_servers_environment(served):
    """Every variable the server was started with reaches the model with its value, and
    Despina adds none of its own."""
    server, _ = served
    view = _view_grpc(server, "stub_view")
    seen = view["environ"]
    assert seen[SETTING_ENV] == SETTING_VALUE
    # What `despina serve` was started with, as the kernel holds it (the C environment
    # a child inherits can hold more than this process's os.environ: pytest's readline
    # sets COLUMNS and LINES there).
    assert server.proc is not None
    raw = Path(f"/proc/{server.proc.pid}/environ").read_bytes()
    env = dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    assert env[SETTING_ENV] == SETTING_VALUE
    missing = {k for k in env if k not in _SHELL_OWN and seen.get(k) != env[k]}
    assert missing == set()
    added = set(seen) - set(env) - _SHELL_OWN
    assert added == set(), {k: seen[k] for k in added}


def test_model_folders_are_on_sys_path(served):
    """The version folder and the model folder are on sys.path, as the stub appends them,
    and initialize gets the repository and version as Triton passes them."""
    server, _ = served
    view = _view_http(server, "stub_view")
    assert view["version_dir_in_path"] is True
    assert view["model_dir_in_path"] is True
    assert os.path.realpath(view["model_repository"]) == os.path.realpath(
        server.repository / "stub_view"
    )
    assert view["model_version"] == "1"


def test_unittest_main_in_initialize_runs_the_models_tests(served):
    """Triton's qa pattern ``unittest.main("model", exit=False)`` in initialize: it parses
    sys.argv, imports ``model`` from the version folder and runs its one test, which
    checks sys.argv == [""]; the model loads and answers."""
    server, _ = served
    result = _view_http(server, "stub_unittest")
    assert result == {"ran": 1, "ok": True, "failures": []}
    assert _view_grpc(server, "stub_unittest") == result
