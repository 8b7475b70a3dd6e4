"""Model control through the real server (issue #15): modes explicit and poll, load with
config and file overrides, unload, reload under concurrent load, a broken model beside
good ones, --exit-on-error. Each model ``scale_*`` multiplies its input by a number the
test chose, so an answer says which load (and which version) served it."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import helper, numpy_helper
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, DespinaServer, free_port

CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
instance_group [ {{ count: {count} kind: KIND_CPU }} ]
{extra}"""


def scale_onnx(factor: float) -> bytes:
    """An ONNX model: OUTPUT0 = INPUT0 * factor (FP32, [batch, n])."""
    shape = ["batch", "n"]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["INPUT0", "K"], ["OUTPUT0"])],
        "scale",
        [helper.make_tensor_value_info("INPUT0", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("OUTPUT0", onnx.TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array([factor], dtype=np.float32), "K")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def write_scale(
    root: Path,
    name: str,
    factors: dict[int, float],
    extra: str = "",
    count: int = 1,
    filename: str = "model.onnx",
) -> Path:
    model = root / name
    model.mkdir(parents=True, exist_ok=True)
    for version, factor in factors.items():
        (model / str(version)).mkdir(exist_ok=True)
        (model / str(version) / filename).write_bytes(scale_onnx(factor))
    (model / "config.pbtxt").write_text(CONFIG.format(name=name, count=count, extra=extra))
    return model


def infer(client, name: str, version: str = "") -> float:
    """The model's factor: what it makes of a 1.0."""
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    tensor = module.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 1), dtype=np.float32))
    result = client.infer(name, [tensor], model_version=version)
    return float(result.as_numpy("OUTPUT0")[0, 0])


def index(client) -> dict[str, list[tuple[str, str, str]]]:
    """name -> [(version, state, reason)] from the HTTP repository index."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for entry in client.get_model_repository_index():
        out.setdefault(entry["name"], []).append(
            (entry.get("version", ""), entry.get("state", ""), entry.get("reason", ""))
        )
    return out


def wait_for(check, timeout: float = 30.0, what: str = "condition"):
    """Poll ``check`` until it returns something true (its value) or time runs out."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except InferenceServerException as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen in {timeout}s (last: {last!r})")


class Hammer:
    """A client thread inferring all the time; counts answers by factor and errors."""

    def __init__(self, url: str, name: str, grpc: bool = False) -> None:
        self.url, self.name, self.grpc = url, name, grpc
        self.factors: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Hammer:
        self._thread.start()
        wait_for(lambda: len(self.factors) >= 5, 20, "the first answers")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        module = grpcclient if self.grpc else httpclient
        client = module.InferenceServerClient(self.url)
        while not self._stop.is_set():
            try:
                self.factors.append(infer(client, self.name))
            except InferenceServerException as exc:
                self.errors.append(str(exc.message()))
        client.close()


@pytest.fixture(scope="module")
def explicit(tmp_path_factory):
    root = tmp_path_factory.mktemp("explicit")
    write_scale(root, "scale_a", {1: 2.0, 2: 3.0})  # latest: version 2 serves
    write_scale(root, "scale_b", {1: 5.0})
    write_scale(
        root,
        "scale_all",
        {1: 7.0, 2: 8.0, 3: 9.0},
        'version_policy: { specific: { versions: [1, 3] } }\ndefault_model_filename: "m.onnx"',
        filename="m.onnx",
    )
    (root / "broken").mkdir()
    (root / "broken" / "1").mkdir()
    (root / "broken" / "config.pbtxt").write_text('name: "broken"\nplatform: "onnxruntime_onnx"\n')
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    shutil.copytree(SHIPPED_REPOSITORY / "identity_fp32", root / "identity_fp32")
    shutil.copytree(SHIPPED_REPOSITORY / "add_sub", root / "add_sub")
    second = tmp_path_factory.mktemp("second_repository")
    write_scale(second, "scale_second", {1: 13.0})
    srv = DespinaServer(
        root,
        tmp_path_factory.mktemp("logs") / "serve.log",
        [
            "--model-control-mode=explicit",
            "--load-model=scale_a",
            "--load-model=scale_all",
            "--load-model=broken",
            f"--model-repository={second}",
            f"--metrics-port={free_port()}",
        ],
    ).start()
    srv.root = root  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def test_explicit_mode_loads_the_named_models_only(explicit):
    client = httpclient.InferenceServerClient(explicit.url)
    entries = index(client)
    assert entries["scale_a"] == [("2", "READY", "")]
    assert entries["scale_b"] == [("", "", "")]  # in the repository, not loaded
    assert entries["identity_fp32"] == [("", "", "")]
    assert infer(client, "scale_a") == 3.0
    with pytest.raises(InferenceServerException, match="unknown model"):
        infer(client, "scale_b")
    # The ``ready`` filter, on both protocols.
    ready = {e["name"] for e in client.get_model_repository_index() if e.get("state") == "READY"}
    assert ready == {"scale_a", "scale_all"}
    grpc = grpcclient.InferenceServerClient(explicit.grpc_url)
    assert {m.name for m in grpc.get_model_repository_index().models} >= {"scale_b", "broken"}
    body = json.dumps({"ready": True}).encode()
    import urllib.request

    request = urllib.request.Request(f"http://{explicit.url}/v2/repository/index", body)
    with urllib.request.urlopen(request) as response:
        filtered = json.loads(response.read())
    assert {e["name"] for e in filtered} == {"scale_a", "scale_all"}
    assert all(e["state"] == "READY" for e in filtered)
    client.close()
    grpc.close()


def test_version_policy_default_filename_and_versions_not_loaded(explicit):
    client = grpcclient.InferenceServerClient(explicit.grpc_url)
    # specific [1, 3] from m.onnx (default_model_filename)
    assert infer(client, "scale_all", "1") == 7.0
    assert infer(client, "scale_all", "3") == 9.0
    assert infer(client, "scale_all") == 9.0
    with pytest.raises(InferenceServerException, match="version 2 is not found"):
        infer(client, "scale_all", "2")
    with pytest.raises(InferenceServerException, match="version 1 is not found"):
        infer(client, "scale_a", "1")  # latest { num_versions: 1 } serves version 2 only
    client.close()


def test_broken_model_is_unavailable_beside_good_ones(explicit):
    client = httpclient.InferenceServerClient(explicit.url)
    (entry,) = index(client)["broken"]
    assert entry[1] == "UNAVAILABLE" and "load failed" in entry[2], entry
    assert infer(client, "scale_a") == 3.0
    with pytest.raises(InferenceServerException) as info:
        client.load_model("broken")
    assert "failed to load 'broken'" in info.value.message()
    # A config that cannot be used names the field.
    with pytest.raises(InferenceServerException) as info:
        client.load_model("scale_b", config=json.dumps({"max_batch_size": -1}))
    assert "max_batch_size" in info.value.message()
    assert infer(client, "scale_a") == 3.0
    client.close()


def test_load_unload_and_load_again_over_both_protocols(explicit):
    http = httpclient.InferenceServerClient(explicit.url)
    grpc = grpcclient.InferenceServerClient(explicit.grpc_url)
    http.load_model("scale_b")
    assert http.is_model_ready("scale_b")
    assert infer(grpc, "scale_b") == 5.0
    grpc.unload_model("scale_b")
    assert not http.is_model_ready("scale_b")
    assert index(http)["scale_b"] == [("1", "UNAVAILABLE", "unloaded")]
    with pytest.raises(InferenceServerException):
        infer(http, "scale_b")
    assert http.is_server_ready()  # an unloaded model keeps no one waiting
    grpc.load_model("scale_b")
    assert infer(http, "scale_b") == 5.0
    http.unload_model("scale_b")
    http.unload_model("scale_b")  # not loaded: nothing to do
    with pytest.raises(InferenceServerException, match="failed to load 'nowhere'"):
        grpc.load_model("nowhere")
    # The second --model-repository is one repository with the first.
    assert index(http)["scale_second"] == [("", "", "")]
    grpc.load_model("scale_second")
    assert infer(http, "scale_second") == 13.0
    http.unload_model("scale_second")
    http.close()
    grpc.close()


def test_load_with_a_config_override(explicit):
    client = httpclient.InferenceServerClient(explicit.url)
    config = {
        "max_batch_size": 8,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
        "version_policy": {"all": {}},
    }
    client.load_model("scale_a", config=json.dumps(config))
    assert infer(client, "scale_a", "1") == 2.0
    assert infer(client, "scale_a", "2") == 3.0
    assert client.get_model_config("scale_a")["version_policy"] == {"all": {}}
    # Without the override again: the folder's config.pbtxt (latest: version 2 only).
    client.load_model("scale_a", config=None)
    grpc = grpcclient.InferenceServerClient(explicit.grpc_url)
    grpc.load_model("scale_a", config=json.dumps({**config, "version_policy": {"latest": {}}}))
    assert infer(grpc, "scale_a") == 3.0
    with pytest.raises(InferenceServerException, match="version 1 is not found"):
        infer(grpc, "scale_a", "1")
    client.close()
    grpc.close()


def test_load_from_file_overrides(explicit):
    config = json.dumps(
        {
            "backend": "onnxruntime",
            "max_batch_size": 8,
            "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
            "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
        }
    )
    http = httpclient.InferenceServerClient(explicit.url)
    grpc = grpcclient.InferenceServerClient(explicit.grpc_url)
    http.load_model("from_files", config=config, files={"file:1/model.onnx": scale_onnx(11.0)})
    assert infer(grpc, "from_files") == 11.0
    grpc.load_model("from_files", config=config, files={"file:1/model.onnx": scale_onnx(12.0)})
    assert infer(http, "from_files") == 12.0
    assert not list(explicit.root.glob("from_files*"))  # never inside the repository
    for bad in ("file:../escape/model.onnx", "file:/tmp/x/model.onnx", "file:1/../../x"):
        with pytest.raises(InferenceServerException, match="relative path"):
            http.load_model("sneaky", config=config, files={bad: b"x"})
    with pytest.raises(InferenceServerException, match="must also give the model's 'config'"):
        http.load_model("from_files", files={"file:1/model.onnx": scale_onnx(1.0)})
    assert infer(http, "from_files") == 12.0
    http.unload_model("from_files")
    http.close()
    grpc.close()


@pytest.mark.parametrize("grpc", [False, True], ids=["http", "grpc"])
def test_reload_under_load_drops_nothing(explicit, grpc):
    config = json.dumps(
        {
            "platform": "onnxruntime_onnx",
            "max_batch_size": 8,
            "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
            "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
        }
    )
    control = httpclient.InferenceServerClient(explicit.url)
    control.load_model("swap", config=config, files={"file:1/model.onnx": scale_onnx(1.0)})
    url = explicit.grpc_url if grpc else explicit.url
    with Hammer(url, "swap", grpc) as hammer:
        for factor in (2.0, 3.0, 4.0):
            control.load_model(
                "swap", config=config, files={"file:1/model.onnx": scale_onnx(factor)}
            )
            seen = len(hammer.factors)
            wait_for(lambda s=seen: len(hammer.factors) > s + 5, 20, "answers after the reload")
            assert hammer.factors[-1] == factor
    assert hammer.errors == []
    assert set(hammer.factors) == {1.0, 2.0, 3.0, 4.0}
    control.unload_model("swap")
    control.close()


@pytest.mark.parametrize("grpc", [False, True], ids=["http", "grpc"])
def test_unload_under_load_fails_only_with_unavailable(explicit, grpc):
    control = httpclient.InferenceServerClient(explicit.url)
    control.load_model("identity_fp32")
    url = explicit.grpc_url if grpc else explicit.url
    hammer = Hammer(url, "scale_a", grpc)
    with hammer:
        before = len(hammer.factors)
        control.unload_model("scale_a")
        wait_for(lambda: len(hammer.errors) > 5, 20, "refusals after the unload")
    assert len(hammer.factors) >= before
    assert hammer.errors and all(
        "is not ready" in e or "has no available versions" in e for e in hammer.errors
    ), hammer.errors[:3]
    control.load_model("scale_a")
    assert infer(control, "scale_a") == 3.0
    control.close()


def test_python_model_reloads_and_unloads_under_load(explicit):
    """A Python model's instances are processes: a reload starts new ones beside the old,
    an unload stops them; a client inferring meanwhile loses nothing to the reload."""
    http = httpclient.InferenceServerClient(explicit.url)
    http.load_model("add_sub")
    config = http.get_model_config("add_sub")
    errors: list[str] = []
    done = threading.Event()
    answered = [0]

    def run() -> None:
        client = grpcclient.InferenceServerClient(explicit.grpc_url)
        a = np.arange(16, dtype=np.float32).reshape(1, 16)
        inputs = [grpcclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        for tensor in inputs:
            tensor.set_data_from_numpy(a)
        while not done.is_set():
            try:
                result = client.infer("add_sub", inputs)
                assert (result.as_numpy("OUTPUT0") == 2 * a).all()
                answered[0] += 1
            except InferenceServerException as exc:
                errors.append(exc.message())
        client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: answered[0] > 5, 20, "the first answers")
        config["instance_group"][0]["count"] = 2
        http.load_model("add_sub", config=json.dumps(config))
        assert http.get_model_config("add_sub")["instance_group"][0]["count"] == 2
        seen = answered[0]
        wait_for(lambda: answered[0] > seen + 5, 20, "answers after the reload")
    finally:
        done.set()
        thread.join(30)
    assert errors == []
    # The launcher and the new load's two instance processes; the old one has stopped.
    python = "--framework python"
    wait_for(lambda: len(explicit.child_pids(python)) == 3, 20, "the old instance to exit")
    http.unload_model("add_sub")
    assert index(http)["add_sub"] == [("1", "UNAVAILABLE", "unloaded")]
    wait_for(lambda: len(explicit.child_pids(python)) == 1, 20, "the instances to exit")
    http.close()


def test_model_control_on_the_aiohttp_transport(tmp_path):
    """The aiohttp HTTP transport serves the same operations (routes.py's one table)."""
    root = tmp_path / "repo"
    write_scale(root, "scale_h", {1: 2.0})
    srv = DespinaServer(
        root,
        tmp_path / "serve.log",
        ["--model-control-mode=explicit", f"--metrics-port={free_port()}"],
        env={"DESPINA_HTTP_TRANSPORT": "aiohttp"},
    ).start()
    try:
        client = httpclient.InferenceServerClient(srv.url)
        assert index(client) == {"scale_h": [("", "", "")]}
        client.load_model("scale_h")
        assert infer(client, "scale_h") == 2.0
        config = client.get_model_config("scale_h")
        client.load_model(
            "scale_h", config=json.dumps(config), files={"file:1/model.onnx": scale_onnx(9.0)}
        )
        assert infer(client, "scale_h") == 9.0
        with pytest.raises(InferenceServerException, match="relative path"):
            client.load_model("x", config=json.dumps(config), files={"file:../x": b"x"})
        client.unload_model("scale_h", unload_dependents=True)
        assert index(client) == {"scale_h": [("1", "UNAVAILABLE", "unloaded")]}
        client.close()
    finally:
        assert srv.stop() == 0


def test_poll_mode_follows_the_repository(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    write_scale(root, "scale_p", {1: 2.0})
    srv = DespinaServer(
        root,
        tmp_path / "serve.log",
        [
            "--model-control-mode=poll",
            "--repository-poll-secs=1",
            "--strict-readiness=false",
            f"--metrics-port={free_port()}",
        ],
    ).start()
    try:
        client = httpclient.InferenceServerClient(srv.url)
        assert infer(client, "scale_p") == 2.0
        with pytest.raises(InferenceServerException, match="not allowed if polling is enabled"):
            client.load_model("scale_p")
        # Added: a model, then a version of it.
        write_scale(root, "scale_q", {1: 4.0})
        wait_for(lambda: infer(client, "scale_q") == 4.0, 30, "the added model")
        with Hammer(srv.url, "scale_p") as hammer:
            # Changed: a new file for version 1 (another factor); no request fails.
            (root / "scale_p" / "1" / "model.onnx").write_bytes(scale_onnx(6.0))
            wait_for(lambda: hammer.factors[-1] == 6.0, 30, "the changed model")
        assert hammer.errors == []
        # A version added under the default policy (latest 1): version 2 replaces 1.
        write_scale(root, "scale_q", {2: 8.0})
        wait_for(lambda: infer(client, "scale_q") == 8.0, 30, "the added version")
        # Removed.
        shutil.rmtree(root / "scale_q")
        wait_for(lambda: "scale_q" not in index(client), 30, "the removal")
        with pytest.raises(InferenceServerException, match="unknown model"):
            infer(client, "scale_q")
        assert infer(client, "scale_p") == 6.0
        client.close()
    finally:
        assert srv.stop() == 0


def test_a_model_of_a_new_framework_gets_a_backend_host(tmp_path):
    """Poll mode, an ONNX-only repository: a Python model added later gets a backend host
    of its own, started by ``despina serve``."""
    root = tmp_path / "repo"
    write_scale(root, "scale_n", {1: 2.0})
    srv = DespinaServer(
        root,
        tmp_path / "serve.log",
        [
            "--model-control-mode=poll",
            "--repository-poll-secs=1",
            f"--metrics-port={free_port()}",
        ],
    ).start()
    try:
        assert not srv.child_pids("--framework python")
        shutil.copytree(SHIPPED_REPOSITORY / "add_sub", root / "add_sub")
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        wait_for(lambda: client.is_model_ready("add_sub"), 40, "the Python model")
        assert len(srv.child_pids("--framework python")) >= 1
        a = np.ones((1, 16), dtype=np.float32)
        inputs = [grpcclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        for tensor in inputs:
            tensor.set_data_from_numpy(a)
        assert (client.infer("add_sub", inputs).as_numpy("OUTPUT0") == 2).all()
        assert infer(client, "scale_n") == 2.0
        client.close()
    finally:
        assert srv.stop() == 0


def test_exit_on_error_stops_the_server_and_the_default_serves_on(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    write_scale(root, "scale_ok", {1: 2.0})
    write_scale(root, "scale_bad", {1: 2.0})
    (root / "scale_bad" / "1" / "model.onnx").write_bytes(b"garbage")
    srv = DespinaServer(root, tmp_path / "serve.log", [f"--metrics-port={free_port()}"]).start()
    try:
        client = httpclient.InferenceServerClient(srv.url)
        assert infer(client, "scale_ok") == 2.0
        assert index(client)["scale_bad"][0][1] == "UNAVAILABLE"
        client.close()
    finally:
        srv.stop()
    strict = DespinaServer(
        root, tmp_path / "strict.log", ["--exit-on-error=true", f"--metrics-port={free_port()}"]
    ).start(wait_ready=False)
    try:
        assert strict.proc is not None
        strict.proc.wait(60)
        assert strict.proc.returncode != 0
        assert "--exit-on-error" in strict.log() and "scale_bad" in strict.log()
    finally:
        strict.stop()
    assert os.path.isdir(root / "scale_ok")
