"""The Python backend runs Triton-format model.py files unchanged.

Each test writes a real model repository entry (config.pbtxt text + <version>/model.py)
into tmp_path, loads it through PythonBackend and checks computed values, error codes and
messages. The pb_utils tests at the end exercise triton_python_backend_utils directly.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from despina.common.errors import Code, ServerError
from despina.services.backend_host.backend import ExecRequest, InstanceSpec
from despina.services.backend_host.backends.python import triton_python_backend_utils as pb_utils
from despina.services.backend_host.backends.python.backend import (
    PythonBackend,
    PythonModelInstance,
    triton_instance_name,
)

ADD_SUB_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }},
  {{ name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] }}
]
output [
  {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }},
  {{ name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] }}
]
instance_group [ {{ count: 2 kind: KIND_CPU }} ]
"""

# Triton's examples/add_sub/model.py, in substance.
ADD_SUB_MODEL = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = model_config = json.loads(args["model_config"])
        output0_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT0")
        output1_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT1")
        self.output0_dtype = pb_utils.triton_string_to_numpy(output0_config["data_type"])
        self.output1_dtype = pb_utils.triton_string_to_numpy(output1_config["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1")
            out_0 = in_0.as_numpy() + in_1.as_numpy()
            out_1 = in_0.as_numpy() - in_1.as_numpy()
            out_tensor_0 = pb_utils.Tensor("OUTPUT0", out_0.astype(self.output0_dtype))
            out_tensor_1 = pb_utils.Tensor("OUTPUT1", out_1.astype(self.output1_dtype))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out_tensor_0, out_tensor_1]))
        return responses

    def finalize(self):
        pass
"""

SIMPLE_CONFIG = """
name: "{name}"
backend: "python"
input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] }} ]
"""


def write_model(
    root: Path,
    name: str,
    model_py: str,
    config: str = SIMPLE_CONFIG,
    *,
    version: str = "1",
    filename: str = "model.py",
    extra: dict[str, str] | None = None,
    instance_index: int = 0,
) -> InstanceSpec:
    model_dir = root / name
    version_dir = model_dir / version
    version_dir.mkdir(parents=True, exist_ok=True)
    config_text = config.format(name=name)
    (model_dir / "config.pbtxt").write_text(config_text)
    (version_dir / filename).write_text(textwrap.dedent(model_py))
    for rel, text in (extra or {}).items():
        path = version_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    parsed = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    return InstanceSpec(
        model_name=name,
        version=version,
        model_dir=model_dir,
        config=parsed,
        instance_index=instance_index,
    )


def fp32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def request(inputs: dict[str, np.ndarray], outputs: list[str] | None = None, **kw) -> ExecRequest:
    return ExecRequest(
        request_id=kw.pop("request_id", ""),
        inputs=inputs,
        requested_outputs=outputs or [],
        parameters=kw.pop("parameters", {}),
    )


@pytest.fixture
def load():
    """Load through PythonBackend; unload every instance at teardown."""
    loaded: list[PythonModelInstance] = []

    def _load(spec: InstanceSpec) -> PythonModelInstance:
        instance = PythonBackend().load(spec)
        loaded.append(instance)
        return instance

    yield _load
    for instance in loaded:
        instance.unload()


# -- add_sub -------------------------------------------------------------------------


def test_add_sub_computes_each_request_of_a_batch(tmp_path, load):
    instance = load(write_model(tmp_path, "add_sub", ADD_SUB_MODEL, ADD_SUB_CONFIG))
    a, b = fp32(1, 2, 3, 4), fp32(10, 20, 30, 40)
    c, d = fp32(0.5, 0.5, 0.5, 0.5), fp32(-1, -2, -3, -4)

    responses = instance.execute(
        [request({"INPUT0": a, "INPUT1": b}), request({"INPUT0": c, "INPUT1": d})]
    )

    assert [r.error for r in responses] == [None, None]
    np.testing.assert_array_equal(responses[0].outputs["OUTPUT0"], fp32(11, 22, 33, 44))
    np.testing.assert_array_equal(responses[0].outputs["OUTPUT1"], fp32(-9, -18, -27, -36))
    np.testing.assert_array_equal(responses[1].outputs["OUTPUT0"], fp32(-0.5, -1.5, -2.5, -3.5))
    np.testing.assert_array_equal(responses[1].outputs["OUTPUT1"], fp32(1.5, 2.5, 3.5, 4.5))
    assert responses[0].outputs["OUTPUT0"].dtype == np.float32


def test_only_requested_outputs_are_returned(tmp_path, load):
    instance = load(write_model(tmp_path, "add_sub", ADD_SUB_MODEL, ADD_SUB_CONFIG))
    inputs = {"INPUT0": fp32(5, 5, 5, 5), "INPUT1": fp32(1, 2, 3, 4)}

    (response,) = instance.execute([request(inputs, ["OUTPUT1"])])

    assert list(response.outputs) == ["OUTPUT1"]
    np.testing.assert_array_equal(response.outputs["OUTPUT1"], fp32(4, 3, 2, 1))


def test_outputs_not_in_the_config_are_dropped_when_none_requested(tmp_path, load):
    model = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for r in requests:
                x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x * 2), pb_utils.Tensor("EXTRA", x)]))
            return out
    """
    instance = load(write_model(tmp_path, "extra", model))

    (response,) = instance.execute([request({"IN": fp32(1, 2)})])

    assert list(response.outputs) == ["OUT"]
    np.testing.assert_array_equal(response.outputs["OUT"], fp32(2, 4))


def test_inputs_and_outputs_are_not_copied(tmp_path, load):
    model = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            return [
                pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy())])
                for r in requests
            ]
    """
    instance = load(write_model(tmp_path, "identity", model))
    x = fp32(1, 2, 3)
    x.flags.writeable = False  # as a shared-memory view arrives

    (response,) = instance.execute([request({"IN": x})])

    assert response.outputs["OUT"] is x


# -- what the model sees -------------------------------------------------------------

INTROSPECT_MODEL = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.args = args

    def execute(self, requests):
        responses = []
        for r in requests:
            seen = {
                "args": self.args,
                "request_id": r.request_id(),
                "correlation_id": r.correlation_id(),
                "flags": r.flags(),
                "timeout": r.timeout(),
                "parameters": r.parameters(),
                "requested": sorted(r.requested_output_names()),
                "inputs": [[t.name(), t.triton_dtype(), t.shape()] for t in r.inputs()],
                "missing": pb_utils.get_input_tensor_by_name(r, "NOPE"),
            }
            blob = np.array([json.dumps(seen).encode()], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("SEEN", blob)]))
        return responses
"""

INTROSPECT_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ 2 ] }} ]
output [
  {{ name: "SEEN" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "OTHER" data_type: TYPE_INT64 dims: [ 1 ] }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "greeting" value {{ string_value: "hello" }} }}
dynamic_batching {{ max_queue_delay_microseconds: 100 }}
"""


def seen_by_model(instance: PythonModelInstance, req: ExecRequest) -> dict:
    (response,) = instance.execute([req])
    assert response.error is None
    blob = response.outputs["SEEN"]
    assert blob.dtype == np.object_
    return json.loads(blob[0])


def test_initialize_gets_tritons_args(tmp_path, load):
    spec = write_model(tmp_path, "introspect", INTROSPECT_MODEL, INTROSPECT_CONFIG, version="3")
    instance = load(spec)

    args = seen_by_model(instance, request({"IN": fp32(1, 2)[None]}, ["SEEN"]))["args"]

    assert set(args) == {
        "model_config",
        "model_instance_kind",
        "model_instance_name",
        "model_instance_device_id",
        "model_repository",
        "model_version",
        "model_name",
    }
    assert args["model_instance_kind"] == "CPU"
    assert args["model_instance_name"] == "introspect_0_0"
    assert args["model_instance_device_id"] == "0"
    assert args["model_repository"] == str(tmp_path / "introspect")
    assert args["model_version"] == "3"
    assert args["model_name"] == "introspect"
    config = json.loads(args["model_config"])
    # Triton's JSON: proto field names, enum names, 64-bit integers as numbers.
    assert config["name"] == "introspect"
    assert config["max_batch_size"] == 8
    assert config["input"][0] == pb_utils.get_input_config_by_name(config, "IN")
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["dims"] == [2]
    assert pb_utils.get_output_config_by_name(config, "OTHER")["data_type"] == "TYPE_INT64"
    assert pb_utils.get_output_config_by_name(config, "NOPE") is None
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert config["parameters"]["greeting"] == {"string_value": "hello"}
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


def test_request_as_the_model_sees_it(tmp_path, load):
    instance = load(write_model(tmp_path, "introspect", INTROSPECT_MODEL, INTROSPECT_CONFIG))
    req = request(
        {"IN": fp32(1, 2)[None]},
        ["SEEN"],
        request_id="req-7",
        parameters={"temperature": 0.5, "mode": "fast", "sequence_id": 42, "sequence_start": True},
    )

    seen = seen_by_model(instance, req)

    assert seen["request_id"] == "req-7"
    assert seen["correlation_id"] == 42
    assert seen["flags"] == pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
    assert seen["timeout"] == 0
    # parameters() is a JSON string, without the ones Triton turns into request fields
    assert json.loads(seen["parameters"]) == {"temperature": 0.5, "mode": "fast"}
    assert seen["requested"] == ["SEEN"]
    assert seen["inputs"] == [["IN", 11, [1, 2]]]  # 11: TYPE_FP32
    assert seen["missing"] is None


def test_request_without_outputs_or_parameters(tmp_path, load):
    instance = load(write_model(tmp_path, "introspect", INTROSPECT_MODEL, INTROSPECT_CONFIG))

    seen = seen_by_model(instance, request({"IN": fp32(1, 2)[None]}))

    assert seen["request_id"] == ""
    assert seen["correlation_id"] == 0
    assert seen["flags"] == 0
    assert seen["parameters"] == "{}"
    assert seen["requested"] == ["OTHER", "SEEN"]  # none named: every output of the config


# -- errors --------------------------------------------------------------------------


def test_triton_error_fails_only_its_request_with_its_code(tmp_path, load):
    model = """
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for r in requests:
                x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
                if x[0] < 0:
                    err = pb_utils.TritonError("negative input is not allowed", pb_utils.TritonError.INVALID_ARG)
                    responses.append(pb_utils.InferenceResponse(output_tensors=[], error=err))
                elif x[0] == 0:
                    responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("zero")))
                else:
                    responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.sqrt(x))]))
            return responses
    """
    instance = load(write_model(tmp_path, "checked", model))

    ok, bad, zero = instance.execute(
        [request({"IN": fp32(4, 9)}), request({"IN": fp32(-1)}), request({"IN": fp32(0)})]
    )

    np.testing.assert_array_equal(ok.outputs["OUT"], fp32(2, 3))
    assert ok.error is None
    assert bad.outputs == {}
    assert bad.error.code is Code.INVALID_ARG
    assert bad.error.message == "negative input is not allowed"
    assert zero.error.code is Code.INTERNAL  # TritonError's default code
    assert zero.error.message == "zero"


RAISING_MODEL = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
            if x[0] < 0:
                raise ValueError("cannot handle negative values")
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy() + 1)]) for r in requests]
"""


def test_exception_in_execute_fails_the_batch_and_instance_survives(tmp_path, load, caplog):
    spec = write_model(tmp_path, "raiser", RAISING_MODEL)
    instance = load(spec)

    with pytest.raises(ServerError) as info:
        instance.execute([request({"IN": fp32(1)}), request({"IN": fp32(-1)}, request_id="r2")])

    err = info.value
    assert err.code is Code.INTERNAL
    assert err.message.startswith(
        "Failed to process the request(s) for model instance 'raiser_0_0', "
        "message: ValueError: cannot handle negative values"
    )
    assert f"{spec.version_dir / 'model.py'}(" in err.message  # the model's frame
    assert "): execute" in err.message
    assert "backend.py" not in err.message  # not Despina's own frames
    assert "r2" in caplog.text

    (response,) = instance.execute([request({"IN": fp32(1)})])
    np.testing.assert_array_equal(response.outputs["OUT"], fp32(2))


def test_wrong_number_of_responses_fails_the_batch(tmp_path, load):
    model = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            return [pb_utils.InferenceResponse([])]
    """
    instance = load(write_model(tmp_path, "short", model))

    with pytest.raises(ServerError) as info:
        instance.execute([request({"IN": fp32(1)}) for _ in range(3)])

    assert info.value.code is Code.INTERNAL
    assert info.value.message == (
        "Failed to process the request(s) for model instance 'short_0_0', message: "
        "Number of InferenceResponse objects do not match the number of InferenceRequest "
        "objects. InferenceRequest(s) size is:3, and InferenceResponse(s) size is:1\n"
    )


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        ("None", "Expected a list in the execute return, found type '<class 'NoneType'>'."),
        (
            "tuple(pb_utils.InferenceResponse() for _ in requests)",
            "Expected a list in the execute return, found type '<class 'tuple'>'.",
        ),
        (
            "[{'OUT': 1} for _ in requests]",
            "Expected an 'InferenceResponse' object in the execute function return list, "
            "found type '<class 'dict'>'.",
        ),
    ],
)
def test_malformed_execute_result_fails_the_batch(tmp_path, load, returned, expected):
    model = f"""
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            return {returned}
    """
    instance = load(write_model(tmp_path, "malformed", model))

    with pytest.raises(ServerError) as info:
        instance.execute([request({"IN": fp32(1)})])

    assert info.value.code is Code.INTERNAL
    assert info.value.message.endswith(expected)


def test_broken_import_fails_load_with_the_reason(tmp_path):
    model = """
    import triton_python_backend_utils as pb_utils
    import a_module_that_does_not_exist

    class TritonPythonModel:
        def execute(self, requests):
            return []
    """
    spec = write_model(tmp_path, "broken", model)

    with pytest.raises(ServerError) as info:
        PythonBackend().load(spec)

    message = info.value.message
    assert info.value.code is Code.INTERNAL
    assert "broken_0_0" in message
    assert "ModuleNotFoundError: No module named 'a_module_that_does_not_exist'" in message
    assert f"{spec.version_dir / 'model.py'}(3): <module>" in message


def test_syntax_error_fails_load(tmp_path):
    spec = write_model(tmp_path, "syntax", "class TritonPythonModel(:\n    pass\n")

    with pytest.raises(ServerError) as info:
        PythonBackend().load(spec)

    assert info.value.code is Code.INTERNAL
    assert "SyntaxError" in info.value.message


def test_exception_in_initialize_fails_load(tmp_path):
    model = """
    class TritonPythonModel:
        def initialize(self, args):
            raise RuntimeError("weights file is missing")

        def execute(self, requests):
            return []
    """
    spec = write_model(tmp_path, "noinit", model)

    with pytest.raises(ServerError) as info:
        PythonBackend().load(spec)

    assert info.value.code is Code.INTERNAL
    assert info.value.message.startswith(
        "Failed to initialize Python model instance 'noinit_0_0': "
        "RuntimeError: weights file is missing"
    )
    assert "): initialize" in info.value.message


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("X = 1\n", "does not define class 'TritonPythonModel'"),
        ("class TritonPythonModel:\n    pass\n", "does not implement `execute` method."),
    ],
)
def test_model_file_without_a_usable_model_class(tmp_path, model, expected):
    spec = write_model(tmp_path, "empty", model)

    with pytest.raises(ServerError) as info:
        PythonBackend().load(spec)

    assert info.value.code is Code.INVALID_ARG
    assert expected in info.value.message


def test_missing_model_file(tmp_path):
    spec = write_model(tmp_path, "nofile", "X = 1\n", filename="other.py")

    with pytest.raises(ServerError) as info:
        PythonBackend().load(spec)

    assert info.value.code is Code.INVALID_ARG
    assert f"Python model file not found in '{spec.version_dir / 'model.py'}'" in info.value.message


def test_decoupled_models_load_and_refuse_requests_outside_a_stream(tmp_path):
    # Streams themselves: tests/e2e/test_decoupled.py (a request the executor did not
    # hand over as a stream's is refused as Triton refuses ModelInfer).
    config = SIMPLE_CONFIG + "model_transaction_policy {{ decoupled: true }}\n"
    model = "class TritonPythonModel:\n    def execute(self, requests):\n        return None\n"
    spec = write_model(tmp_path, "decoupled", model, config)

    instance = PythonBackend().load(spec)
    try:
        assert instance.decoupled is True
        (response,) = instance.execute([ExecRequest("r", {"IN": fp32(1)}, [])])
        assert response.error is not None and response.error.code is Code.UNSUPPORTED
        assert response.error.message == (
            "ModelInfer RPC doesn't support models with decoupled transaction policy"
        )
    finally:
        instance.unload()


# -- loading features ----------------------------------------------------------------


def test_default_model_filename_and_sibling_imports(tmp_path, load):
    config = SIMPLE_CONFIG + 'default_model_filename: "scaler.py"\n'
    model = """
    import triton_python_backend_utils as pb_utils

    import helper_abs  # plain sibling import: the version folder is on sys.path
    from .helper_rel import OFFSET  # relative import: Triton imports '<version>.model'

    class TritonPythonModel:
        def execute(self, requests):
            return [
                pb_utils.InferenceResponse([
                    pb_utils.Tensor("OUT", helper_abs.scale(pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()) + OFFSET)
                ])
                for r in requests
            ]
    """
    extra = {
        "helper_abs.py": "def scale(x):\n    return x * 10\n",
        "helper_rel.py": "OFFSET = 1\n",
    }
    instance = load(
        write_model(tmp_path, "siblings", model, config, filename="scaler.py", extra=extra)
    )

    (response,) = instance.execute([request({"IN": fp32(1, 2)})])

    np.testing.assert_array_equal(response.outputs["OUT"], fp32(11, 21))


def test_model_module_is_found_by_its_name_as_an_import_leaves_it(tmp_path, load):
    """``unittest.main(__name__)`` in initialize (a pattern of Triton's qa models):
    ``__import__`` returns the package and unittest walks down to the model module by
    attribute, which must be there as an import statement would have left it."""
    model = """
    import unittest

    import triton_python_backend_utils as pb_utils

    class ModuleTest(unittest.TestCase):
        def test_runs(self):
            self.assertTrue(True)

    class TritonPythonModel:
        def initialize(self, args):
            test = unittest.main(__name__, argv=[""], exit=False)
            self.ran = float(test.result.testsRun) if test.result.wasSuccessful() else -1.0

        def execute(self, requests):
            return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", [self.ran])]) for _ in requests]
    """
    instance = load(write_model(tmp_path, "by_name", model))

    (response,) = instance.execute([request({"IN": fp32(0)})])

    np.testing.assert_array_equal(response.outputs["OUT"], np.array([1.0]))


def test_finalize_runs_on_unload(tmp_path):
    marker = tmp_path / "finalized.txt"
    config = (
        SIMPLE_CONFIG
        + 'parameters {{ key: "marker" value {{ string_value: "'
        + str(marker)
        + '" }} }}\n'
    )
    model = """
    import json

    class TritonPythonModel:
        def initialize(self, args):
            config = json.loads(args["model_config"])
            self.marker = config["parameters"]["marker"]["string_value"]

        def execute(self, requests):
            return []

        def finalize(self):
            with open(self.marker, "w") as f:
                f.write("bye")
    """
    instance = PythonBackend().load(write_model(tmp_path, "final", model, config))
    assert not marker.exists()

    instance.unload()

    assert marker.read_text() == "bye"


def test_async_execute_and_auto_complete_config_hook(tmp_path, load):
    model = """
    import asyncio

    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        @staticmethod
        def auto_complete_config(auto_complete_model_config):
            return auto_complete_model_config  # called by the launcher, before instances

        async def initialize(self, args):
            await asyncio.sleep(0)
            self.factor = 3

        async def execute(self, requests):
            await asyncio.sleep(0)
            return [
                pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy() * self.factor)])
                for r in requests
            ]
    """
    instance = load(write_model(tmp_path, "asyncmodel", model))

    (response,) = instance.execute([request({"IN": fp32(1, 2)})])

    np.testing.assert_array_equal(response.outputs["OUT"], fp32(3, 6))


def test_bytes_tensors_in_and_out(tmp_path, load):
    config = """
    name: "{name}"
    backend: "python"
    input [ {{ name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] }} ]
    output [
      {{ name: "UPPER" data_type: TYPE_STRING dims: [ -1 ] }},
      {{ name: "LENGTHS" data_type: TYPE_INT32 dims: [ -1 ] }}
    ]
    """
    model = """
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for r in requests:
                text = pb_utils.get_input_tensor_by_name(r, "TEXT")
                assert text.triton_dtype() == 13  # TYPE_BYTES
                words = [w.decode() for w in text.as_numpy().reshape(-1)]
                upper = np.array([w.upper() for w in words])  # a np.str_ array
                lengths = np.array([len(w) for w in words], dtype=np.int32)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("UPPER", upper), pb_utils.Tensor("LENGTHS", lengths)]))
            return responses
    """
    instance = load(write_model(tmp_path, "strings", model, textwrap.dedent(config)))
    text = np.array([b"hello", b"triton"], dtype=np.object_)

    (response,) = instance.execute([request({"TEXT": text})])

    assert response.outputs["UPPER"].dtype == np.object_
    assert response.outputs["UPPER"].tolist() == [b"HELLO", b"TRITON"]
    np.testing.assert_array_equal(response.outputs["LENGTHS"], np.array([5, 6], dtype=np.int32))


def test_model_logger_writes_to_python_logging(tmp_path, load, caplog):
    model = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def initialize(self, args):
            logger = pb_utils.Logger
            logger.log_info("info message")
            logger.log_warn("warn message")
            logger.log_error("error message")
            logger.log_verbose("verbose message")
            logger.log("explicit level", logger.WARNING)

        def execute(self, requests):
            return []
    """
    with caplog.at_level(logging.DEBUG, logger="despina.python_model"):
        load(write_model(tmp_path, "logging", model))

    records = {r.getMessage(): r for r in caplog.records if r.name == "despina.python_model"}
    assert records["info message"].levelno == logging.INFO
    assert records["warn message"].levelno == logging.WARNING
    assert records["error message"].levelno == logging.ERROR
    assert records["verbose message"].levelno == logging.DEBUG
    assert records["explicit level"].levelno == logging.WARNING
    assert records["info message"].pathname.endswith("model.py")  # the model's own line


def test_instance_names_follow_triton(tmp_path):
    config = """
    name: "{name}"
    backend: "python"
    instance_group [
      {{ count: 2 kind: KIND_CPU }},
      {{ name: "special" count: 2 kind: KIND_CPU }}
    ]
    """
    names = [
        triton_instance_name(
            write_model(tmp_path, "m", "X = 1\n", textwrap.dedent(config), instance_index=i)
        )
        for i in range(5)
    ]

    assert names == ["m_0_0", "m_0_1", "special_0", "special_1", "m_0_4"]


# -- triton_python_backend_utils -----------------------------------------------------


def test_tensor_accessors():
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    tensor = pb_utils.Tensor("X", x)

    assert tensor.name() == "X"
    assert tensor.as_numpy() is x
    assert tensor.shape() == [2, 3]
    assert tensor.triton_dtype() == 9  # TYPE_INT64
    assert tensor.is_cpu()
    assert pb_utils.triton_to_numpy_type(tensor.triton_dtype()) is np.int64


def test_tensor_makes_arrays_contiguous_and_rejects_bad_input():
    view = np.arange(12, dtype=np.float32).reshape(3, 4).T
    tensor = pb_utils.Tensor("T", view)
    assert tensor.as_numpy().flags.c_contiguous
    np.testing.assert_array_equal(tensor.as_numpy(), view)

    with pytest.raises(pb_utils.TritonModelException, match="empty string"):
        pb_utils.Tensor("", view)
    with pytest.raises(pb_utils.TritonModelException, match="not supported"):
        pb_utils.Tensor("C", np.array([1 + 2j]))


def test_dtype_helpers():
    assert pb_utils.triton_string_to_numpy("TYPE_FP32") is np.float32
    assert pb_utils.triton_string_to_numpy("TYPE_STRING") is np.object_
    assert pb_utils.triton_string_to_numpy("TYPE_BOOL") is bool
    with pytest.raises(KeyError):
        pb_utils.triton_string_to_numpy("TYPE_NOPE")
    assert pb_utils.numpy_to_triton_type(np.float32) == 11
    assert pb_utils.numpy_to_triton_type(np.dtype(np.uint8)) == 2
    assert pb_utils.numpy_to_triton_type(np.object_) == 13
    assert pb_utils.numpy_to_triton_type(np.bytes_) == 13
    assert pb_utils.numpy_to_triton_type(np.complex64) is None
    assert pb_utils.triton_to_numpy_type(1) is np.bool_
    assert pb_utils.triton_to_numpy_type(14) is None  # BF16 has no numpy type


def test_bytes_codec_round_trip():
    array = np.array([[b"a", b""], [b"\x00bc", "d\u00e9"]], dtype=np.object_)

    encoded = pb_utils.serialize_byte_tensor(array)

    assert (
        encoded
        == b"\x01\x00\x00\x00a\x00\x00\x00\x00\x03\x00\x00\x00\x00bc\x03\x00\x00\x00d\xc3\xa9"
    )
    decoded = pb_utils.deserialize_bytes_tensor(encoded)
    assert decoded.dtype == np.object_
    assert decoded.tolist() == [b"a", b"", b"\x00bc", "d\u00e9".encode()]
    assert pb_utils.serialize_byte_tensor(np.array([1.0])) is None
    assert pb_utils.serialize_byte_tensor(np.array([], dtype=np.object_)) == b""
    with pytest.raises(pb_utils.TritonModelException, match="truncated"):
        pb_utils.deserialize_bytes_tensor(b"\x05\x00")


def test_triton_error_codes():
    err = pb_utils.TritonError("boom")
    assert err.message() == "boom"
    assert err.code() == pb_utils.TritonError.INTERNAL
    assert str(err) == "boom"
    codes = [
        pb_utils.TritonError.UNKNOWN,
        pb_utils.TritonError.INTERNAL,
        pb_utils.TritonError.NOT_FOUND,
        pb_utils.TritonError.INVALID_ARG,
        pb_utils.TritonError.UNAVAILABLE,
        pb_utils.TritonError.UNSUPPORTED,
        pb_utils.TritonError.ALREADY_EXISTS,
        pb_utils.TritonError.CANCELLED,
    ]
    assert [int(c) for c in codes] == list(range(8))  # TRITONSERVER_Error_Code values
    assert pb_utils.TritonError("x", pb_utils.TritonError.CANCELLED).code() is codes[-1]
    with pytest.raises(TypeError):
        pb_utils.TritonError(None)


def test_inference_response_accessors_and_validation():
    out = pb_utils.Tensor("OUT", np.zeros(2, dtype=np.float32))
    response = pb_utils.InferenceResponse(output_tensors=[out])
    assert response.output_tensors() == [out]
    assert not response.has_error()
    assert response.error() is None
    assert pb_utils.get_output_tensor_by_name(response, "OUT") is out
    assert pb_utils.get_output_tensor_by_name(response, "NOPE") is None

    failed = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError("bad"))
    assert failed.has_error() and failed.error().message() == "bad"

    with pytest.raises(pb_utils.TritonModelException, match="must be a list"):
        pb_utils.InferenceResponse(output_tensors=out)
    with pytest.raises(TypeError):
        pb_utils.InferenceResponse(output_tensors=[np.zeros(2)])
    with pytest.raises(TypeError):
        pb_utils.InferenceResponse(error="not a TritonError")


def test_dlpack_round_trip_without_copies():
    torch = pytest.importorskip("torch")
    x = np.arange(4, dtype=np.float32)
    tensor = pb_utils.Tensor("X", x)

    as_torch = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
    as_torch += 1  # shares memory with x
    np.testing.assert_array_equal(x, fp32(1, 2, 3, 4))

    back = pb_utils.Tensor.from_dlpack("Y", as_torch)
    assert back.name() == "Y"
    assert back.triton_dtype() == 11
    assert np.shares_memory(back.as_numpy(), x)

    from_capsule = pb_utils.Tensor.from_dlpack("Z", pb_utils.Tensor("X", x).to_dlpack())
    assert np.shares_memory(from_capsule.as_numpy(), x)

    readonly = x.copy()
    readonly.flags.writeable = False
    np.testing.assert_array_equal(
        torch.utils.dlpack.from_dlpack(pb_utils.Tensor("R", readonly).to_dlpack()).numpy(), readonly
    )
    with pytest.raises(pb_utils.TritonModelException, match="string tensors"):
        pb_utils.Tensor("S", np.array([b"a"], dtype=np.object_)).to_dlpack()


def test_later_features_say_they_are_not_supported_yet():
    req = pb_utils.InferenceRequest(
        model_name="other", inputs=[pb_utils.Tensor("IN", fp32(1))], requested_output_names=["OUT"]
    )
    assert req.inputs()[0].name() == "IN"
    assert req.requested_output_names() == {"OUT"}
    assert req.correlation_id() == 0
    for call in (
        req.exec,
        req.async_exec,
        lambda: pb_utils.MetricFamily("m", "d", pb_utils.MetricFamily.COUNTER),
        lambda: pb_utils.load_model("other"),
    ):
        with pytest.raises(pb_utils.TritonModelException, match="not supported by Despina yet"):
            call()
    with pytest.raises(pb_utils.TritonModelException, match="decoupled transaction policy"):
        req.get_response_sender()  # a request of a model that is not decoupled
    assert req.is_cancelled() is False
    assert pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL == 1
    assert pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END == 2
    assert pb_utils.using_decoupled_model_transaction_policy({}) is False
