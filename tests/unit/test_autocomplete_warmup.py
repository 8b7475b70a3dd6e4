"""The pieces of auto-complete and warmup that are plain functions: pb_utils.ModelConfig
(the helper a Python model's auto_complete_config gets) and warmup.samples (the tensors a
config's model_warmup asks for)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from despina.common import dtypes, model_config
from despina.common import messages as m
from despina.common.errors import Code, ServerError
from despina.services.backend_host import warmup
from despina.services.backend_host.backends.onnxruntime import OnnxRuntimeBackend
from despina.services.backend_host.backends.python import triton_python_backend_utils as pb
from despina.services.backend_host.host import BackendHost


def test_model_config_adds_tensors_and_batching() -> None:
    helper = pb.ModelConfig({"name": "m", "max_batch_size": 0, "input": [], "output": []})
    helper.add_input({"name": "IN", "data_type": "TYPE_FP32", "dims": [3], "optional": True})
    helper.add_output({"name": "OUT", "data_type": "TYPE_INT8", "dims": (2, 2)})
    helper.set_max_batch_size(8)
    helper.set_dynamic_batching()
    helper.set_model_transaction_policy({"decoupled": False})
    assert helper.as_dict() == {
        "name": "m",
        "max_batch_size": 8,
        "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [3], "optional": True}],
        "output": [{"name": "OUT", "data_type": "TYPE_INT8", "dims": [2, 2]}],
        "dynamic_batching": {},
        "model_transaction_policy": {"decoupled": False},
    }


def test_model_config_existing_tensor_must_agree() -> None:
    given = {"name": "m", "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [3]}]}
    helper = pb.ModelConfig(given)
    helper.add_input({"name": "IN", "data_type": "TYPE_FP32", "dims": [3]})  # same: kept
    assert len(helper.as_dict()["input"]) == 1
    with pytest.raises(ValueError, match="expects datatype TYPE_FP32"):
        helper.add_input({"name": "IN", "data_type": "TYPE_INT32", "dims": [3]})
    with pytest.raises(ValueError, match="dims"):
        helper.add_input({"name": "IN", "data_type": "TYPE_FP32", "dims": [4]})
    with pytest.raises(ValueError, match="missing 'dims'"):
        helper.add_output({"name": "OUT", "data_type": "TYPE_FP32"})
    with pytest.raises(ValueError, match="unknown property 'optional'"):
        helper.add_output({"name": "OUT", "data_type": "TYPE_FP32", "dims": [1], "optional": 1})


def test_model_config_max_batch_size_and_sequences_as_triton() -> None:
    with pytest.raises(ValueError, match="max_batch_size 4"):
        pb.ModelConfig({"name": "m", "max_batch_size": 4}).set_max_batch_size(8)
    with pytest.raises(ValueError, match="sequence_batching"):
        pb.ModelConfig({"name": "m", "sequence_batching": {"x": 1}}).set_dynamic_batching()


def sample(**inputs: dict) -> dict:
    return {"name": "s", "batch_size": 2, "count": 3, "inputs": inputs}


def test_samples_zero_random_and_batch(tmp_path: Path) -> None:
    config = {
        "max_batch_size": 4,
        "model_warmup": [
            sample(
                Z={"data_type": "TYPE_INT16", "dims": [2, 3], "zero_data": True},
                R={"data_type": "TYPE_FP32", "dims": [5], "random_data": True},
                S={"data_type": "TYPE_STRING", "dims": [1], "zero_data": True},
            )
        ],
    }
    [(name, count, requests)] = warmup.samples(config, tmp_path)
    assert (name, count, len(requests)) == ("s", 3, 2)  # batch_size requests of batch 1
    z, r, s = requests[0]["Z"], requests[0]["R"], requests[0]["S"]
    assert (z.shape, z.dtype, z.any()) == ((1, 2, 3), np.int16, False)
    assert (r.shape, r.dtype) == ((1, 5), np.float32)
    assert ((r >= 0) & (r < 1)).all()
    assert s.tolist() == [[b""]]


def test_samples_unbatched_model_and_file_data(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    values = np.arange(6, dtype=np.int32)
    (tmp_path / "warmup" / "x.bin").write_bytes(values.tobytes())
    (tmp_path / "warmup" / "s.bin").write_bytes(dtypes.serialize_bytes(np.array([b"ab", b"c"])))
    config = {
        "model_warmup": [
            sample(
                X={"data_type": "TYPE_INT32", "dims": [2, 3], "input_data_file": "x.bin"},
                S={"data_type": "TYPE_STRING", "dims": [2], "input_data_file": "s.bin"},
            )
        ]
    }
    [(_, _, requests)] = warmup.samples(config, tmp_path)
    assert len(requests) == 1  # no batching: one request whatever batch_size says
    np.testing.assert_array_equal(requests[0]["X"], values.reshape(2, 3))
    assert requests[0]["S"].tolist() == [b"ab", b"c"]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"data_type": "TYPE_FP32", "dims": [-1], "zero_data": True}, "must be fixed"),
        ({"data_type": "TYPE_NOPE", "dims": [1], "zero_data": True}, "is not valid"),
        ({"data_type": "TYPE_FP32", "dims": [2], "input_data_file": "none.bin"}, "cannot read"),
        ({"data_type": "TYPE_FP32", "dims": [2], "input_data_file": "../x"}, "must name a file"),
    ],
)
def test_samples_refuse_what_cannot_be_built(tmp_path: Path, spec: dict, fragment: str) -> None:
    with pytest.raises(ServerError) as exc_info:
        warmup.samples({"model_warmup": [sample(IN=spec)]}, tmp_path)
    assert exc_info.value.code is Code.INVALID_ARG
    assert "warmup sample 's', input 'IN'" in exc_info.value.message
    assert fragment in exc_info.value.message


def test_samples_batch_size_over_max_is_refused(tmp_path: Path) -> None:
    config = {"max_batch_size": 1, "model_warmup": [sample()]}
    with pytest.raises(ServerError, match="exceeds the model's max_batch_size 1"):
        warmup.samples(config, tmp_path)


def _load_msg(tmp_path: Path, text: str) -> m.LoadModel:
    config = model_config.parse_text(text)
    return m.LoadModel("m", "1", str(tmp_path), config.SerializeToString(), [0])


def test_host_refuses_to_complete_without_a_backend_that_can(tmp_path: Path) -> None:
    """TorchScript (and TensorRT): Triton's backends cannot read inputs and outputs from
    the file, so an incomplete config is a load failure that says so."""
    host = SimpleNamespace(backend=object(), framework="pytorch")
    with pytest.raises(ServerError) as exc_info:
        BackendHost._complete_config(host, _load_msg(tmp_path, 'backend: "pytorch"'))
    assert "the pytorch backend cannot complete the inputs and outputs" in exc_info.value.message
    complete = 'backend: "pytorch" input [{name: "I" data_type: TYPE_FP32 dims: [1]}] ' + (
        'output [{name: "O" data_type: TYPE_FP32 dims: [1]}]'
    )
    assert BackendHost._complete_config(host, _load_msg(tmp_path, complete)) == b""


def test_host_completes_onnx_from_the_graph(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.INT64, ["n", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.INT64, ["n", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (tmp_path / "1").mkdir()
    save(model, str(tmp_path / "1" / "model.onnx"))
    host = SimpleNamespace(backend=OnnxRuntimeBackend(), framework="onnxruntime")
    msg = _load_msg(
        tmp_path, 'name: "m" backend: "onnxruntime" default_model_filename: "model.onnx"'
    )
    config = model_config.ModelConfig()
    config.ParseFromString(BackendHost._complete_config(host, msg))
    assert config.max_batch_size == 4
    assert [(i.name, model_config.datatype(i), list(i.dims)) for i in config.input] == [
        ("X", "INT64", [3])
    ]
    assert [o.name for o in config.output] == ["Y"]
