"""Config auto-complete as Triton does it, and ``reshape``: an ONNX model without
config.pbtxt (or with one that declares no inputs/outputs) is completed from its graph by
the backend host that loads it, a Python model by its ``auto_complete_config``; /config
shows the completed config over HTTP and gRPC and requests are checked against it.
Under ``--strict-model-config=true`` the incomplete ones are UNAVAILABLE with the reason.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from conftest import DespinaServer

PY_AUTO = textwrap.dedent(
    """
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        @staticmethod
        def auto_complete_config(auto_complete_model_config):
            auto_complete_model_config.add_input(
                {"name": "IN", "data_type": "TYPE_INT32", "dims": [3]})
            auto_complete_model_config.add_output(
                {"name": "OUT", "data_type": "TYPE_INT32", "dims": [3]})
            auto_complete_model_config.set_max_batch_size(8)
            return auto_complete_model_config

        def execute(self, requests):
            return [
                pb_utils.InferenceResponse([pb_utils.Tensor(
                    "OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy() * 3)])
                for r in requests
            ]
    """
)

RESHAPE_CONFIG = """
name: "reshaped"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] reshape { shape: [ 2, 2 ] } } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] reshape { shape: [ 2, 2 ] } } ]
"""

# The model sees [batch, 2, 2] and says so: SEEN is the shape it got, OUT its input back.
PY_RESHAPE = textwrap.dedent(
    """
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for r in requests:
                x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
                seen = np.array([list(x.shape)] * x.shape[0], np.int64)
                out.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("OUT", x.T.copy().T), pb_utils.Tensor("SEEN", seen)]))
            return out
    """
)

PY_RESHAPE_CONFIG = """
name: "reshaped_py"
backend: "python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] reshape { shape: [ 2, 2 ] } } ]
output [
  { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] reshape { shape: [ 2, 2 ] } },
  { name: "SEEN" data_type: TYPE_INT64 dims: [ 3 ] }
]
"""


def _model(nodes, inputs, outputs, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def add_onnx() -> onnx.ModelProto:
    """SUM = A + B, all FP32 [batch, 4] with a dynamic batch dimension."""
    io = TensorProto.FLOAT
    return _model(
        [helper.make_node("Add", ["A", "B"], ["SUM"])],
        [helper.make_tensor_value_info(n, io, ["batch", 4]) for n in ("A", "B")],
        [helper.make_tensor_value_info("SUM", io, ["batch", 4])],
        "add",
    )


def fixed_onnx() -> onnx.ModelProto:
    """OUT = identity of IN, INT32 [2, 3]: no dynamic first dimension, so no batching."""
    return _model(
        [helper.make_node("Identity", ["IN"], ["OUT"])],
        [helper.make_tensor_value_info("IN", TensorProto.INT32, [2, 3])],
        [helper.make_tensor_value_info("OUT", TensorProto.INT32, [2, 3])],
        "fixed",
    )


def square_onnx() -> onnx.ModelProto:
    """Y = X @ X for a [batch, 2, 2] X: the model sees 2x2 matrices (reshape's shape)."""
    io = TensorProto.FLOAT
    return _model(
        [helper.make_node("MatMul", ["X", "X"], ["Y"])],
        [helper.make_tensor_value_info("X", io, [None, 2, 2])],
        [helper.make_tensor_value_info("Y", io, [None, 2, 2])],
        "square",
    )


def build_repository(root: Path) -> Path:
    (root / "onnx_noconfig" / "1").mkdir(parents=True)
    onnx.save(add_onnx(), root / "onnx_noconfig" / "1" / "model.onnx")
    (root / "onnx_noio" / "1").mkdir(parents=True)
    (root / "onnx_noio" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')
    onnx.save(fixed_onnx(), root / "onnx_noio" / "1" / "model.onnx")
    (root / "py_auto" / "1").mkdir(parents=True)
    (root / "py_auto" / "1" / "model.py").write_text(PY_AUTO)
    (root / "reshaped" / "1").mkdir(parents=True)
    (root / "reshaped" / "config.pbtxt").write_text(RESHAPE_CONFIG)
    onnx.save(square_onnx(), root / "reshaped" / "1" / "model.onnx")
    (root / "reshaped_py" / "1").mkdir(parents=True)
    (root / "reshaped_py" / "config.pbtxt").write_text(PY_RESHAPE_CONFIG)
    (root / "reshaped_py" / "1" / "model.py").write_text(PY_RESHAPE)
    return root


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return build_repository(tmp_path_factory.mktemp("autocomplete"))


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    srv = DespinaServer(repository, tmp_path_factory.mktemp("logs") / "serve.log")
    srv.start()
    yield srv
    srv.stop()


def http_config(srv: DespinaServer, model: str) -> dict:
    return httpclient.InferenceServerClient(srv.url).get_model_config(model)


def grpc_config(srv: DespinaServer, model: str) -> dict:
    return grpcclient.InferenceServerClient(srv.grpc_url).get_model_config(model, as_json=True)[
        "config"
    ]


def tensors(config: dict, kind: str) -> list[tuple[str, str, list[int]]]:
    return [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config[kind]]


@pytest.mark.parametrize("get_config", [http_config, grpc_config], ids=["http", "grpc"])
def test_onnx_without_config_is_completed_from_its_graph(server, get_config) -> None:
    config = get_config(server, "onnx_noconfig")
    assert config["name"] == "onnx_noconfig"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime"
    # The first dimension is dynamic in every input and output: the batch dimension.
    assert int(config["max_batch_size"]) == 4
    assert tensors(config, "input") == [("A", "TYPE_FP32", [4]), ("B", "TYPE_FP32", [4])]
    assert tensors(config, "output") == [("SUM", "TYPE_FP32", [4])]


@pytest.mark.parametrize("get_config", [http_config, grpc_config], ids=["http", "grpc"])
def test_onnx_config_without_io_keeps_fixed_shapes(server, get_config) -> None:
    config = get_config(server, "onnx_noio")
    assert int(config.get("max_batch_size", 0)) == 0
    assert tensors(config, "input") == [("IN", "TYPE_INT32", [2, 3])]
    assert tensors(config, "output") == [("OUT", "TYPE_INT32", [2, 3])]


@pytest.mark.parametrize("get_config", [http_config, grpc_config], ids=["http", "grpc"])
def test_python_auto_complete_config(server, get_config) -> None:
    config = get_config(server, "py_auto")
    assert config["backend"] == "python"
    assert int(config["max_batch_size"]) == 8
    assert tensors(config, "input") == [("IN", "TYPE_INT32", [3])]
    assert tensors(config, "output") == [("OUT", "TYPE_INT32", [3])]


def test_completed_models_serve_over_http(server) -> None:
    client = httpclient.InferenceServerClient(server.url)
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.full((2, 4), 10, np.float32)
    ins = [httpclient.InferInput("A", [2, 4], "FP32"), httpclient.InferInput("B", [2, 4], "FP32")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    np.testing.assert_array_equal(client.infer("onnx_noconfig", ins).as_numpy("SUM"), a + b)
    meta = client.get_model_metadata("onnx_noconfig")
    assert meta["inputs"][0]["shape"] == [-1, 4]

    x = np.array([[1, 2, 3]], np.int32)
    inp = httpclient.InferInput("IN", [1, 3], "INT32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("py_auto", [inp]).as_numpy("OUT"), x * 3)


def test_completed_models_serve_over_grpc(server) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    inp = grpcclient.InferInput("IN", [2, 3], "INT32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("onnx_noio", [inp]).as_numpy("OUT"), x)
    # The completed signature is checked: a wrong shape is refused with Triton's words.
    bad = grpcclient.InferInput("IN", [3, 2], "INT32")
    bad.set_data_from_numpy(x.reshape(3, 2))
    with pytest.raises(InferenceServerException, match="IN"):
        client.infer("onnx_noio", [bad])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_reshape_round_trip(server, protocol) -> None:
    """The client sends and gets [batch, 4]; the model multiplies 2x2 matrices."""
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.url if protocol == "http" else server.grpc_url)
    x = np.array([[1, 2, 3, 4], [0, 1, 1, 0]], np.float32)
    inp = module.InferInput("X", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    y = client.infer("reshaped", [inp]).as_numpy("Y")
    expected = np.stack([m @ m for m in x.reshape(2, 2, 2)]).reshape(2, 4)
    assert y.shape == (2, 4)
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_reshape_round_trip_python(server, protocol) -> None:
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.url if protocol == "http" else server.grpc_url)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    inp = module.InferInput("X", [3, 4], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("reshaped_py", [inp])
    assert result.as_numpy("SEEN").tolist() == [[3, 2, 2]] * 3
    np.testing.assert_array_equal(result.as_numpy("OUT"), x)


@pytest.fixture(scope="module")
def strict_server(repository, tmp_path_factory):
    srv = DespinaServer(
        repository, tmp_path_factory.mktemp("logs") / "strict.log", ["--strict-model-config=true"]
    )
    srv.start()
    yield srv
    srv.stop()


def test_strict_model_config_refuses_incomplete_configs(strict_server) -> None:
    http = httpclient.InferenceServerClient(strict_server.url)
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert not http.is_model_ready("onnx_noconfig")
    assert "has no config.pbtxt" in index["onnx_noconfig"]["reason"]
    assert "auto-complete is disabled" in index["onnx_noconfig"]["reason"]
    assert not http.is_model_ready("onnx_noio")
    assert "declares no input" in index["onnx_noio"]["reason"]
    # The complete one beside them serves.
    assert http.is_model_ready("reshaped")
    grpc = grpcclient.InferenceServerClient(strict_server.grpc_url)
    assert not grpc.is_model_ready("py_auto")
    reasons = {m.name: m.reason for m in grpc.get_model_repository_index().models}
    assert "auto-complete is disabled" in reasons["py_auto"]
