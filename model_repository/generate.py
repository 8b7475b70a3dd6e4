"""Build Despina's shipped model repository, and the extra models the tests need.

The models are generated rather than checked in as opaque binaries so that anyone can see
exactly what each graph computes and rebuild it with the ``onnx`` helpers alone. Every
model is written in Triton's repository layout (``<model>/config.pbtxt`` plus
``<model>/1/model.onnx`` or ``<model>/1/model.py``), so the same folder also loads on a
real Triton server, which is how conformance is checked.

Run ``python model_repository/generate.py [--out DIR]`` to (re)write the shipped models
(``simple``, ``simple_string``, ``identity_fp32``, ``add_sub``). The test suite imports
this file by path and calls the builders directly, each of which takes the repository root
and an optional model name and returns the model's folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import onnx
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

# Opset 17 and IR 9: the newest pair every onnxruntime we support (1.17 and later) loads.
OPSET = 17
IR_VERSION = 9

# Triton's data type -> ONNX element type, for the types Triton's onnxruntime backend maps.
ONNX_TYPES: dict[str, int] = {
    "TYPE_BOOL": TensorProto.BOOL,
    "TYPE_UINT8": TensorProto.UINT8,
    "TYPE_UINT16": TensorProto.UINT16,
    "TYPE_UINT32": TensorProto.UINT32,
    "TYPE_UINT64": TensorProto.UINT64,
    "TYPE_INT8": TensorProto.INT8,
    "TYPE_INT16": TensorProto.INT16,
    "TYPE_INT32": TensorProto.INT32,
    "TYPE_INT64": TensorProto.INT64,
    "TYPE_FP16": TensorProto.FLOAT16,
    "TYPE_FP32": TensorProto.FLOAT,
    "TYPE_FP64": TensorProto.DOUBLE,
    "TYPE_STRING": TensorProto.STRING,
}

# Name of the dynamic leading dimension in graphs of models with max_batch_size > 0.
BATCH_DIM = "batch"


class TensorSpec(NamedTuple):
    """One config input or output: its name, Triton ``data_type`` and ``dims`` (no batch)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


# ---------------------------------------------------------------------------------------
# Writing helpers
# ---------------------------------------------------------------------------------------


def _format_tensors(field: str, specs: Sequence[TensorSpec]) -> str:
    entries = []
    for spec in specs:
        dims = ", ".join(str(d) for d in spec.dims)
        entries.append(
            "  {\n"
            f'    name: "{spec.name}"\n'
            f"    data_type: {spec.data_type}\n"
            f"    dims: [ {dims} ]\n"
            "  }"
        )
    return f"{field} [\n" + ",\n".join(entries) + "\n]\n"


def format_config(
    name: str,
    *,
    max_batch_size: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    platform: str | None = None,
    backend: str | None = None,
    instance_count: int = 1,
    instance_kind: str = "KIND_CPU",
) -> str:
    """Render a config.pbtxt in Triton's usual hand-written layout and check it parses.

    Raises ``google.protobuf.text_format.ParseError`` if the text is not a valid
    ``ModelConfig``, so a typo in a builder fails the generator instead of the server.
    """
    lines = [f'name: "{name}"\n']
    if platform is not None:
        lines.append(f'platform: "{platform}"\n')
    if backend is not None:
        lines.append(f'backend: "{backend}"\n')
    lines.append(f"max_batch_size: {max_batch_size}\n")
    text = "".join(lines)
    text += _format_tensors("input", inputs)
    text += _format_tensors("output", outputs)
    text += (
        "instance_group [\n"
        "  {\n"
        f"    count: {instance_count}\n"
        f"    kind: {instance_kind}\n"
        "  }\n"
        "]\n"
    )
    parsed = text_format.Parse(text, model_config_pb2.ModelConfig())
    if parsed.name != name:
        raise ValueError(f"config for '{name}' parsed with name '{parsed.name}'")
    return text


def _model_dir(root: Path, name: str) -> Path:
    version_dir = Path(root) / name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    return version_dir.parent


def _write_config(model_dir: Path, text: str) -> None:
    (model_dir / "config.pbtxt").write_text(text)


def _value_info(spec: TensorSpec, batched: bool) -> onnx.ValueInfoProto:
    shape: list[int | str | None] = [BATCH_DIM] if batched else []
    for i, d in enumerate(spec.dims):
        shape.append(f"{spec.name}_dim{i}" if d < 0 else d)
    return helper.make_tensor_value_info(spec.name, ONNX_TYPES[spec.data_type], shape)


def _write_onnx(
    model_dir: Path,
    graph_name: str,
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    batched: bool,
) -> None:
    """Assemble, check and save ``1/model.onnx``; raises ``onnx.checker`` errors as is."""
    graph = helper.make_graph(
        list(nodes),
        graph_name,
        [_value_info(s, batched) for s in inputs],
        [_value_info(s, batched) for s in outputs],
    )
    model = helper.make_model(
        graph,
        producer_name="despina-model-repository",
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(model_dir / "1" / "model.onnx"))


def _write_python(model_dir: Path, source: str) -> None:
    """Write ``1/model.py`` after compiling it, so a syntax error fails here, not at load."""
    path = model_dir / "1" / "model.py"
    compile(source, str(path), "exec")
    path.write_text(source)


# ---------------------------------------------------------------------------------------
# Shipped models
# ---------------------------------------------------------------------------------------


def simple(root: Path, name: str = "simple") -> Path:
    """Triton's quick-start ``simple``: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1.

    INT32, dims [16], max_batch_size 8; the graph's leading dimension is dynamic.
    """
    inputs = [TensorSpec("INPUT0", "TYPE_INT32", (16,)), TensorSpec("INPUT1", "TYPE_INT32", (16,))]
    outputs = [
        TensorSpec("OUTPUT0", "TYPE_INT32", (16,)),
        TensorSpec("OUTPUT1", "TYPE_INT32", (16,)),
    ]
    model_dir = _model_dir(root, name)
    _write_config(
        model_dir,
        format_config(
            name, platform="onnxruntime_onnx", max_batch_size=8, inputs=inputs, outputs=outputs
        ),
    )
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    _write_onnx(model_dir, name, nodes, inputs, outputs, batched=True)
    return model_dir


def simple_string(root: Path, name: str = "simple_string") -> Path:
    """Triton's ``simple_string``: decimal integers in as strings, sum and difference out.

    The graph parses with Cast(string -> int32), computes in int32 and formats with
    Cast(int32 -> string), all of which onnxruntime's CPU provider implements. A string
    that is not an integer makes the Cast fail, which surfaces as a request error.
    """
    inputs = [
        TensorSpec("INPUT0", "TYPE_STRING", (16,)),
        TensorSpec("INPUT1", "TYPE_STRING", (16,)),
    ]
    outputs = [
        TensorSpec("OUTPUT0", "TYPE_STRING", (16,)),
        TensorSpec("OUTPUT1", "TYPE_STRING", (16,)),
    ]
    model_dir = _model_dir(root, name)
    _write_config(
        model_dir,
        format_config(
            name, platform="onnxruntime_onnx", max_batch_size=8, inputs=inputs, outputs=outputs
        ),
    )
    nodes = [
        helper.make_node("Cast", ["INPUT0"], ["in0_int"], to=TensorProto.INT32),
        helper.make_node("Cast", ["INPUT1"], ["in1_int"], to=TensorProto.INT32),
        helper.make_node("Add", ["in0_int", "in1_int"], ["sum_int"]),
        helper.make_node("Sub", ["in0_int", "in1_int"], ["diff_int"]),
        helper.make_node("Cast", ["sum_int"], ["OUTPUT0"], to=TensorProto.STRING),
        helper.make_node("Cast", ["diff_int"], ["OUTPUT1"], to=TensorProto.STRING),
    ]
    _write_onnx(model_dir, name, nodes, inputs, outputs, batched=True)
    return model_dir


def identity_fp32(root: Path, name: str = "identity_fp32") -> Path:
    """FP32 identity with a variable-length dimension: OUTPUT0 = INPUT0, dims [-1]."""
    inputs = [TensorSpec("INPUT0", "TYPE_FP32", (-1,))]
    outputs = [TensorSpec("OUTPUT0", "TYPE_FP32", (-1,))]
    model_dir = _model_dir(root, name)
    _write_config(
        model_dir,
        format_config(
            name, platform="onnxruntime_onnx", max_batch_size=8, inputs=inputs, outputs=outputs
        ),
    )
    nodes = [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])]
    _write_onnx(model_dir, name, nodes, inputs, outputs, batched=True)
    return model_dir


# Triton's own python_backend add_sub example, unchanged in substance, so that this file
# runs on real Triton as well as on Despina's python backend.
ADD_SUB_PY = '''\
import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Every Python model must use "TritonPythonModel" as the class name."""

    def initialize(self, args):
        """Called once when the model is loaded.

        ``args["model_config"]`` is the model configuration as a JSON string; the output
        data types are read from it so that execute() returns what the config promises.
        """
        self.model_config = model_config = json.loads(args["model_config"])

        output0_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT0")
        output1_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT1")

        self.output0_dtype = pb_utils.triton_string_to_numpy(output0_config["data_type"])
        self.output1_dtype = pb_utils.triton_string_to_numpy(output1_config["data_type"])

    def execute(self, requests):
        """Return one InferenceResponse per request, in the order the requests came."""
        output0_dtype = self.output0_dtype
        output1_dtype = self.output1_dtype

        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1")

            out_0, out_1 = (
                in_0.as_numpy() + in_1.as_numpy(),
                in_0.as_numpy() - in_1.as_numpy(),
            )

            out_tensor_0 = pb_utils.Tensor("OUTPUT0", out_0.astype(output0_dtype))
            out_tensor_1 = pb_utils.Tensor("OUTPUT1", out_1.astype(output1_dtype))

            inference_response = pb_utils.InferenceResponse(
                output_tensors=[out_tensor_0, out_tensor_1]
            )
            responses.append(inference_response)

        return responses

    def finalize(self):
        """Called once when the model is unloaded."""
        print("Cleaning up...")
'''


def add_sub(root: Path, name: str = "add_sub") -> Path:
    """Triton's python_backend ``add_sub`` example: FP32 [16] sum and difference."""
    inputs = [TensorSpec("INPUT0", "TYPE_FP32", (16,)), TensorSpec("INPUT1", "TYPE_FP32", (16,))]
    outputs = [
        TensorSpec("OUTPUT0", "TYPE_FP32", (16,)),
        TensorSpec("OUTPUT1", "TYPE_FP32", (16,)),
    ]
    model_dir = _model_dir(root, name)
    _write_config(
        model_dir,
        format_config(name, backend="python", max_batch_size=8, inputs=inputs, outputs=outputs),
    )
    _write_python(model_dir, ADD_SUB_PY)
    return model_dir


# ---------------------------------------------------------------------------------------
# Test-only models (not written by main())
# ---------------------------------------------------------------------------------------

# Suffix of each INPUT_<suffix>/OUTPUT_<suffix> pair in identity_all_types. Every type in
# ONNX_TYPES runs through Identity on onnxruntime's CPU provider (checked with
# onnxruntime 1.31), so none is left out. BF16 is not here: Triton's onnxruntime backend
# does not list it and numpy has no dtype to feed it with.
ALL_TYPES_SUFFIXES: dict[str, str] = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
}


def identity_all_types(root: Path, name: str = "identity_all") -> Path:
    """One ONNX model with an Identity pair INPUT_<T> -> OUTPUT_<T> per Triton type.

    Suffixes are the wire type names (BOOL ... FP64, and BYTES for TYPE_STRING); dims are
    [-1] with max_batch_size 8, so any length round-trips.
    """
    inputs = [TensorSpec(f"INPUT_{s}", t, (-1,)) for t, s in ALL_TYPES_SUFFIXES.items()]
    outputs = [TensorSpec(f"OUTPUT_{s}", t, (-1,)) for t, s in ALL_TYPES_SUFFIXES.items()]
    model_dir = _model_dir(root, name)
    _write_config(
        model_dir,
        format_config(
            name, platform="onnxruntime_onnx", max_batch_size=8, inputs=inputs, outputs=outputs
        ),
    )
    pairs = zip(inputs, outputs, strict=True)
    nodes = [helper.make_node("Identity", [i.name], [o.name]) for i, o in pairs]
    _write_onnx(model_dir, name, nodes, inputs, outputs, batched=True)
    return model_dir


PYTHON_SLOW_PY = '''\
import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Sleeps SLEEP_MS milliseconds per request and reports the process that served it.

    Tests use it to hold a request in flight and then kill the process named by PID.
    """

    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])

    def execute(self, requests):
        responses = []
        for request in requests:
            sleep_ms = pb_utils.get_input_tensor_by_name(request, "SLEEP_MS").as_numpy()
            slept_ms = max(0, int(sleep_ms.reshape(-1)[0]))
            time.sleep(slept_ms / 1000.0)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("PID", np.array([os.getpid()], dtype=np.int64)),
                        pb_utils.Tensor("SLEPT_MS", np.array([slept_ms], dtype=np.int32)),
                    ]
                )
            )
        return responses

    def finalize(self):
        pass
'''


def python_slow(root: Path, name: str = "slow") -> Path:
    """Python model that sleeps SLEEP_MS (INT32 [1]) and returns PID (INT64 [1]), SLEPT_MS."""
    inputs = [TensorSpec("SLEEP_MS", "TYPE_INT32", (1,))]
    outputs = [TensorSpec("PID", "TYPE_INT64", (1,)), TensorSpec("SLEPT_MS", "TYPE_INT32", (1,))]
    model_dir = _model_dir(root, name)
    _write_config(
        model_dir,
        format_config(name, backend="python", max_batch_size=0, inputs=inputs, outputs=outputs),
    )
    _write_python(model_dir, PYTHON_SLOW_PY)
    return model_dir


PYTHON_ERROR_PY = '''\
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Doubles INPUT0, but answers a request holding a negative value with an error.

    The error is per request: other requests in the same execute() still succeed.
    """

    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])

    def execute(self, requests):
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if np.any(in_0 < 0):
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[],
                        error=pb_utils.TritonError("negative values are not allowed"),
                    )
                )
                continue
            out_0 = (in_0 * 2).astype(np.float32)
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", out_0)])
            )
        return responses

    def finalize(self):
        pass
'''


def python_error(root: Path, name: str = "python_error") -> Path:
    """Python model: OUTPUT0 = INPUT0 * 2 (FP32 [-1]), or a TritonError if any value < 0."""
    inputs = [TensorSpec("INPUT0", "TYPE_FP32", (-1,))]
    outputs = [TensorSpec("OUTPUT0", "TYPE_FP32", (-1,))]
    model_dir = _model_dir(root, name)
    _write_config(
        model_dir,
        format_config(name, backend="python", max_batch_size=0, inputs=inputs, outputs=outputs),
    )
    _write_python(model_dir, PYTHON_ERROR_PY)
    return model_dir


def broken(root: Path, name: str = "broken_onnx") -> Path:
    """A valid onnxruntime_onnx config whose ``1/model.onnx`` is garbage bytes.

    Loading it must fail (the model stays UNAVAILABLE) without disturbing other models.
    """
    inputs = [TensorSpec("INPUT0", "TYPE_FP32", (-1,))]
    outputs = [TensorSpec("OUTPUT0", "TYPE_FP32", (-1,))]
    model_dir = _model_dir(root, name)
    _write_config(
        model_dir,
        format_config(
            name, platform="onnxruntime_onnx", max_batch_size=8, inputs=inputs, outputs=outputs
        ),
    )
    (model_dir / "1" / "model.onnx").write_bytes(b"this is not an onnx model\x00\xff\xfe" * 4)
    return model_dir


SHIPPED = (simple, simple_string, identity_fp32, add_sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the shipped models into ``--out`` (default: this script's folder)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="model repository root to write into (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for build in SHIPPED:
        model_dir = build(args.out)
        print(f"wrote {model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
