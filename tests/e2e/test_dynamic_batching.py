"""The dynamic batcher gathers concurrent requests into one execution, for Python and
ONNX Runtime models, and every request gets its own right answer back: where the backend
host batches what frontends send it directly, and where the scheduler batches."""

from __future__ import annotations

import concurrent.futures
import textwrap

import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto, helper

from conftest import DespinaServer

PROBE = textwrap.dedent(
    """
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                n = np.full((x.shape[0], 1), len(requests), np.int32)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("OUTPUT0", x * 2),
                    pb_utils.Tensor("BATCHED", n),
                ]))
            return responses
    """
)

PROBE_CONFIG = """
name: "probe"
backend: "python"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 300000 }
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "BATCHED" data_type: TYPE_INT32 dims: [ 1 ] }
]
"""

# ONNX: sum and difference, and ROWS, the rows of the batch the model ran (the evidence
# that requests were batched: a request's ROWS exceeds its own rows only then).
ADD_SUB_CONFIG = """
name: "add_sub_dyn"
platform: "onnxruntime_onnx"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 300000 }
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "ROWS" data_type: TYPE_INT32 dims: [ 1 ] }
]
"""


def add_sub_rows_onnx() -> onnx.ModelProto:
    def const(name: str, values: list[int]) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)

    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        helper.make_node("Shape", ["INPUT0"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),  # [rows]
        helper.make_node("Concat", ["n", "one"], ["column"], axis=0),  # [rows, 1]
        helper.make_node("Cast", ["n"], ["n32"], to=TensorProto.INT32),
        helper.make_node("Expand", ["n32", "column"], ["ROWS"]),
    ]
    ints = [
        helper.make_tensor_value_info(name, TensorProto.INT32, [None, 16])
        for name in ("INPUT0", "INPUT1")
    ]
    outs = [
        helper.make_tensor_value_info(name, TensorProto.INT32, [None, 16])
        for name in ("OUTPUT0", "OUTPUT1")
    ]
    outs.append(helper.make_tensor_value_info("ROWS", TensorProto.INT32, [None, 1]))
    graph = helper.make_graph(
        nodes, "add_sub_rows", ints, outs, initializer=[const("zero", [0]), const("one", [1])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


# Batched by the backend host (direct routes, the default) and by the scheduler.
@pytest.fixture(scope="module", params=[[], ["--direct-routes=false"]], ids=["host", "scheduler"])
def batching_server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    (root / "probe" / "1").mkdir(parents=True)
    (root / "probe" / "config.pbtxt").write_text(PROBE_CONFIG)
    (root / "probe" / "1" / "model.py").write_text(PROBE)
    (root / "add_sub_dyn" / "1").mkdir(parents=True)
    (root / "add_sub_dyn" / "config.pbtxt").write_text(ADD_SUB_CONFIG)
    onnx.save(add_sub_rows_onnx(), root / "add_sub_dyn" / "1" / "model.onnx")
    srv = DespinaServer(root, tmp_path_factory.mktemp("logs") / "serve.log", request.param)
    srv.start()
    yield srv
    srv.stop()


def test_python_requests_are_batched(batching_server):
    def one(i: int):
        client = httpclient.InferenceServerClient(batching_server.url, network_timeout=30)
        x = np.full((1, 4), i, np.float32)
        inp = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("probe", [inp])
        client.close()
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * x)
        return int(result.as_numpy("BATCHED")[0, 0])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(one, range(8)))
    # Eight requests sent at once, 300 ms of queue delay: they run in one or two batches.
    assert max(batched) >= 4, batched


def test_lone_request_waits_at_most_the_queue_delay(batching_server):
    import time

    client = httpclient.InferenceServerClient(batching_server.url)
    inp = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    started = time.monotonic()
    result = client.infer("probe", [inp])
    elapsed = time.monotonic() - started
    assert int(result.as_numpy("BATCHED")[0, 0]) == 1
    assert 0.25 < elapsed < 2.0, elapsed
    client.close()


def test_onnx_batches_split_back_per_request(batching_server):
    def one(i: int):
        client = httpclient.InferenceServerClient(batching_server.url, network_timeout=30)
        rows = 1 + i % 3
        a = np.arange(16 * rows, dtype=np.int32).reshape(rows, 16) + 100 * i
        b = np.full((rows, 16), i, np.int32)
        inputs = []
        for name, arr in (("INPUT0", a), ("INPUT1", b)):
            inp = httpclient.InferInput(name, [rows, 16], "INT32")
            inp.set_data_from_numpy(arr, binary_data=True)
            inputs.append(inp)
        result = client.infer("add_sub_dyn", inputs)
        client.close()
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        ran = result.as_numpy("ROWS")
        assert ran.shape == (rows, 1) and len(set(ran.ravel().tolist())) == 1, ran
        return rows, int(ran[0, 0])

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        seen = list(pool.map(one, range(12)))
    # Every request got back its own rows, cut from a batch of at most max_batch_size...
    assert all(rows <= ran <= 8 for rows, ran in seen), seen
    # ...and requests really ran together: six at once, 300 ms of queue delay.
    assert any(ran > rows for rows, ran in seen), seen
