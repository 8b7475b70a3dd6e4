"""With a tiny ``--inline-threshold``, small tensors take the shared-memory path (inputs
through the frontend's arena, outputs through the backend hosts'), and inference over
HTTP binary and gRPC still returns the right bytes, for ONNX and Python models."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import SHIPPED_REPOSITORY, DespinaServer

THRESHOLD = 1024
DOUBLE_CONFIG = """\
name: "python_double"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""
DOUBLE_MODEL = """\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(
                        "OUTPUT0", 2 * pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
                    )
                ]
            )
            for r in requests
        ]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(SHIPPED_REPOSITORY / "identity_fp32", repo / "identity_fp32")
    (repo / "python_double" / "1").mkdir(parents=True)
    (repo / "python_double" / "config.pbtxt").write_text(DOUBLE_CONFIG)
    (repo / "python_double" / "1" / "model.py").write_text(DOUBLE_MODEL)
    srv = DespinaServer(
        repo,
        tmp_path_factory.mktemp("logs") / "serve.log",
        [f"--inline-threshold={THRESHOLD}"],
    ).start()
    yield srv
    assert srv.stop() == 0


# (model, shape, expected output of x)
MODELS = [
    ("identity_fp32", lambda n: [1, n], lambda x: x),
    ("python_double", lambda n: [n], lambda x: 2 * x),
]


def infer_http(server, model: str, shape: list[int], data: np.ndarray) -> np.ndarray:
    client = httpclient.InferenceServerClient(server.url, network_timeout=60)
    try:
        inp = httpclient.InferInput("INPUT0", shape, "FP32")
        inp.set_data_from_numpy(data, binary_data=True)
        out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
        return client.infer(model, [inp], outputs=[out]).as_numpy("OUTPUT0")
    finally:
        client.close()


def infer_grpc(server, model: str, shape: list[int], data: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inp = grpcclient.InferInput("INPUT0", shape, "FP32")
        inp.set_data_from_numpy(data)
        return client.infer(model, [inp]).as_numpy("OUTPUT0")
    finally:
        client.close()


@pytest.mark.parametrize("infer", [infer_http, infer_grpc], ids=["http-binary", "grpc"])
@pytest.mark.parametrize("model,shape_of,expected", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("nbytes", [4096, 256], ids=["4KiB-refs", "256B-inline"])
def test_inference_with_a_tiny_threshold(server, infer, model, shape_of, expected, nbytes):
    shape = shape_of(nbytes // 4)
    data = np.random.default_rng(nbytes).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(infer(server, model, shape, data), expected(data))


def test_small_tensors_went_through_shared_memory(server):
    """After 4 KiB requests, the frontend and both backend hosts have an arena segment:
    with the default threshold none of them would have made one."""
    data = np.ones(THRESHOLD, np.float32)  # 4 KiB, at or above the threshold
    infer_http(server, "identity_fp32", [1, THRESHOLD], data.reshape(1, -1))
    infer_http(server, "python_double", [THRESHOLD], data)
    segments = os.listdir("/dev/shm")

    def has_arena(role: str, needle: str) -> bool:
        pids = server.child_pids(needle)
        return any(
            re.fullmatch(rf"despina_{role}_{pid}_[0-9a-f]+_\d+", name)
            for pid in pids
            for name in segments
        )

    assert has_arena("fe", "despina.services.frontend")
    assert has_arena("bh", "--framework onnxruntime")
    assert has_arena("bh", "--framework python")
