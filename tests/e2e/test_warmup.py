"""``model_warmup`` runs before a model is ready, as in Triton: zero, random and file
data, batch sizes and counts. A Python model counts what it executed and says so in its
outputs, so the first client request proves the warmup ran before it; a model whose
warmup fails is UNAVAILABLE with the reason (the sample named) while the others serve.
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

from conftest import DespinaServer

# EXECS: executions so far (this one included), REQS: requests so far, ZEROS: requests
# whose input was all zeros, RANDOM: requests whose input was neither zeros nor ones.
COUNTER = textwrap.dedent(
    """
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            self.execs = self.reqs = self.zeros = self.random = 0

        def execute(self, requests):
            self.execs += 1
            out = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
                self.reqs += 1
                if not x.any():
                    self.zeros += 1
                elif not (x == 1).all():
                    self.random += 1
                counts = np.array([[self.execs, self.reqs, self.zeros, self.random]], np.int64)
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("COUNTS", counts)]))
            return out
    """
)

COUNTER_CONFIG = """
name: "%s"
backend: "python"
max_batch_size: 4
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "COUNTS" data_type: TYPE_INT64 dims: [ 4 ] } ]
model_warmup [
  {
    name: "zeros"
    batch_size: 1
    count: 2
    inputs { key: "IN" value: { data_type: TYPE_FP32 dims: [ 3 ] zero_data: true } }
  },
  {
    name: "random"
    batch_size: 3
    inputs { key: "IN" value: { data_type: TYPE_FP32 dims: [ 3 ] random_data: true } }
  }
]
"""

FAILING = textwrap.dedent(
    """
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            x = pb_utils.get_input_tensor_by_name(requests[0], "IN").as_numpy()
            if not x.any():
                raise ValueError("zeros are not welcome here")
            return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x)]) for _ in requests]
    """
)

FAILING_CONFIG = """
name: "warm_fails"
backend: "python"
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 2 ] } ]
model_warmup [ {
  name: "all_zero"
  batch_size: 1
  inputs { key: "IN" value: { data_type: TYPE_FP32 dims: [ 2 ] zero_data: true } }
} ]
"""

ONNX_FILE_CONFIG = """
name: "onnx_file_warm"
platform: "onnxruntime_onnx"
max_batch_size: 2
input [ { name: "IN" data_type: TYPE_INT32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 4 ] } ]
model_warmup [ {
  name: "from_file"
  batch_size: 2
  count: 3
  inputs { key: "IN" value: { data_type: TYPE_INT32 dims: [ 4 ] input_data_file: "in.bin" } }
} ]
"""

ONNX_BAD_FILE_CONFIG = ONNX_FILE_CONFIG.replace("onnx_file_warm", "onnx_bad_warm")


def identity_onnx() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["IN"], ["OUT"])],
        "identity",
        [helper.make_tensor_value_info("IN", TensorProto.INT32, [None, 4])],
        [helper.make_tensor_value_info("OUT", TensorProto.INT32, [None, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def build_repository(root: Path) -> Path:
    for name in ("counter", "counter_grpc"):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(COUNTER_CONFIG % name)
        (root / name / "1" / "model.py").write_text(COUNTER)
    (root / "warm_fails" / "1").mkdir(parents=True)
    (root / "warm_fails" / "config.pbtxt").write_text(FAILING_CONFIG)
    (root / "warm_fails" / "1" / "model.py").write_text(FAILING)
    for name, config in (
        ("onnx_file_warm", ONNX_FILE_CONFIG),
        ("onnx_bad_warm", ONNX_BAD_FILE_CONFIG),
    ):
        (root / name / "1").mkdir(parents=True)
        (root / name / "warmup").mkdir()
        (root / name / "config.pbtxt").write_text(config)
        onnx.save(identity_onnx(), root / name / "1" / "model.onnx")
    (root / "onnx_file_warm" / "warmup" / "in.bin").write_bytes(
        np.arange(4, dtype=np.int32).tobytes()
    )
    # Three bytes short of one [1, 4] INT32 tensor.
    (root / "onnx_bad_warm" / "warmup" / "in.bin").write_bytes(b"\0" * 13)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = build_repository(tmp_path_factory.mktemp("warmup"))
    srv = DespinaServer(root, tmp_path_factory.mktemp("logs") / "serve.log")
    srv.start()
    yield srv
    srv.stop()


def test_warmup_runs_before_ready_over_http(server) -> None:
    client = httpclient.InferenceServerClient(server.url)
    assert client.is_model_ready("counter")
    inp = httpclient.InferInput("IN", [1, 3], "FP32")
    inp.set_data_from_numpy(np.ones((1, 3), np.float32))
    counts = client.infer("counter", [inp]).as_numpy("COUNTS")[0].tolist()
    # zeros: 2 executions of 1 request; random: 1 execution of 3 requests; then this one.
    assert counts == [4, 6, 2, 3]


def test_warmup_runs_before_ready_over_grpc(server) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_model_ready("counter_grpc")
    inp = grpcclient.InferInput("IN", [1, 3], "FP32")
    inp.set_data_from_numpy(np.ones((1, 3), np.float32))
    counts = client.infer("counter_grpc", [inp]).as_numpy("COUNTS")[0].tolist()
    assert counts == [4, 6, 2, 3]
    config = client.get_model_config("counter_grpc", as_json=True)["config"]
    assert [w["name"] for w in config["model_warmup"]] == ["zeros", "random"]


def test_warmup_from_file_then_serves(server) -> None:
    client = httpclient.InferenceServerClient(server.url)
    assert client.is_model_ready("onnx_file_warm")
    x = np.array([[5, 6, 7, 8]], np.int32)
    inp = httpclient.InferInput("IN", [1, 4], "INT32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("onnx_file_warm", [inp]).as_numpy("OUT"), x)
    assert "warmed up 'onnx_file_warm' instance 0 with sample 'from_file'" in server.log()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_failed_warmup_leaves_model_unavailable_with_reason(server, protocol) -> None:
    if protocol == "http":
        client = httpclient.InferenceServerClient(server.url)
        reasons = {m["name"]: m.get("reason", "") for m in client.get_model_repository_index()}
        states = {m["name"]: m.get("state", "") for m in client.get_model_repository_index()}
    else:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        index = client.get_model_repository_index().models
        reasons = {m.name: m.reason for m in index}
        states = {m.name: m.state for m in index}
    assert not client.is_model_ready("warm_fails")
    assert states["warm_fails"] == "UNAVAILABLE"
    assert "warmup sample 'all_zero' failed" in reasons["warm_fails"]
    assert "zeros are not welcome here" in reasons["warm_fails"]
    assert not client.is_model_ready("onnx_bad_warm")
    assert states["onnx_bad_warm"] == "UNAVAILABLE"
    assert "in.bin' holds 13 bytes, the input needs 16" in reasons["onnx_bad_warm"]
    # The others serve.
    assert client.is_model_ready("counter") and client.is_model_ready("onnx_file_warm")
