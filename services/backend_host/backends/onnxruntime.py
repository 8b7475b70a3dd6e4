"""ONNX Runtime backend: one ``InferenceSession`` per model instance.

CPU execution provider always; CUDA when the instance is KIND_GPU and the provider is
present. A batch of several requests is concatenated along the batch axis (one copy)
and the outputs split back; a batch of one runs on the request's own arrays.

The backend also completes a config that leaves inputs or outputs out (Triton's
auto-complete, ``complete_config``), and an input or output with a ``reshape`` is
reshaped on its way in (to ``reshape.shape``) and out (to ``dims``).
"""

from __future__ import annotations

import numpy as np

from despina.common import model_config
from despina.common.errors import Code, ServerError, internal, invalid_arg
from despina.services.backend_host.backend import ExecRequest, ExecResponse, InstanceSpec


class OnnxRuntimeInstance:
    def __init__(self, spec: InstanceSpec) -> None:
        import onnxruntime as ort

        config = spec.config
        path = spec.version_dir / config.default_model_filename  # type: ignore[attr-defined]
        if not path.exists():
            raise invalid_arg(f"model file '{path}' does not exist")
        options = ort.SessionOptions()
        params = config.parameters  # type: ignore[attr-defined]
        if "intra_op_thread_count" in params:
            options.intra_op_num_threads = int(params["intra_op_thread_count"].string_value)
        if "inter_op_thread_count" in params:
            options.inter_op_num_threads = int(params["inter_op_thread_count"].string_value)
        providers: list[str | tuple[str, dict]] = ["CPUExecutionProvider"]
        if spec.kind == "KIND_GPU":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ServerError(
                    Code.UNAVAILABLE,
                    f"instance '{spec.instance_name}' asks for KIND_GPU but onnxruntime has no "
                    "CUDA execution provider on this machine",
                )
            providers = [
                ("CUDAExecutionProvider", {"device_id": spec.device_id}),
                "CPUExecutionProvider",
            ]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise invalid_arg(f"onnxruntime could not load '{path}': {exc}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.string_inputs = {
            i.name for i in self.session.get_inputs() if i.type == "tensor(string)"
        }
        self.string_outputs = {
            o.name for o in self.session.get_outputs() if o.type == "tensor(string)"
        }
        self.batched = config.max_batch_size > 0  # type: ignore[attr-defined]
        self.config_outputs = {o.name: model_config.datatype(o) for o in config.output}  # type: ignore[attr-defined]
        # name -> the shape without batch dimension the model sees (inputs) or the client
        # sees (outputs); only for those with a reshape, so the rest pay nothing.
        self.reshape_in = {
            i.name: tuple(i.reshape.shape)
            for i in config.input  # type: ignore[attr-defined]
            if i.HasField("reshape")
        }
        self.reshape_out = {
            o.name: tuple(o.dims)
            for o in config.output  # type: ignore[attr-defined]
            if o.HasField("reshape")
        }

    def _feed(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for name, arr in inputs.items():
            if name in self.string_inputs:
                # onnxruntime takes strings as Python str objects; bytes are misread.
                arr = np.array(
                    [
                        x.decode("utf-8", "replace") if isinstance(x, bytes) else x
                        for x in arr.reshape(-1)
                    ],
                    dtype=object,
                ).reshape(arr.shape)
            feed[name] = arr
        return feed

    def _reshape(self, arrays: dict[str, np.ndarray], shapes: dict) -> dict[str, np.ndarray]:
        batched = self.batched
        out = dict(arrays)
        for name, shape in shapes.items():
            arr = out.get(name)
            if arr is not None:
                out[name] = arr.reshape((arr.shape[0], *shape) if batched else shape)
        return out

    def _run(self, inputs: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        names = wanted or self.output_names
        if self.reshape_in:
            inputs = self._reshape(inputs, self.reshape_in)
        try:
            results = self.session.run(names, self._feed(inputs) if self.string_inputs else inputs)
        except Exception as exc:
            raise internal(f"onnxruntime failed to run the model: {exc}") from None
        out = dict(zip(names, results))
        for name in self.string_outputs.intersection(out):
            value = out[name]
            out[name] = np.array(
                [str(x).encode() for x in value.reshape(-1)], dtype=object
            ).reshape(value.shape)
        if self.reshape_out:
            out = self._reshape(out, self.reshape_out)
        return out

    def execute(self, requests: list[ExecRequest]) -> list[ExecResponse]:
        if len(requests) == 1:
            req = requests[0]
            return [ExecResponse(self._run(req.inputs, req.requested_outputs))]
        wanted = sorted({n for r in requests for n in (r.requested_outputs or self.output_names)})
        sizes = [next(iter(r.inputs.values())).shape[0] for r in requests]
        merged = {
            name: np.concatenate([r.inputs[name] for r in requests], axis=0)
            for name in requests[0].inputs
        }
        outputs = self._run(merged, wanted)
        cuts = np.cumsum(sizes)[:-1]
        parts = {name: np.split(value, cuts, axis=0) for name, value in outputs.items()}
        return [
            ExecResponse({n: parts[n][i] for n in (r.requested_outputs or self.output_names)})
            for i, r in enumerate(requests)
        ]

    def unload(self) -> None:
        self.session = None  # type: ignore[assignment]


# onnxruntime's type names -> Triton's data types
ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


def model_signature(path: object) -> tuple[list, list]:
    """The (name, Triton data type, shape with -1 for a dynamic dimension) of each input
    and output of an ONNX file, read by onnxruntime. Raises INVALID_ARG when the file
    cannot be read or holds a type Triton has no name for."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise invalid_arg(
            f"onnxruntime could not read '{path}' to complete its config: {exc}"
        ) from None

    def tensors(args: list) -> list:
        out = []
        for arg in args:
            if arg.type not in ORT_TYPES:
                raise invalid_arg(
                    f"'{path}': {arg.name} has type {arg.type}, which no Triton data type "
                    "names: declare it in config.pbtxt"
                )
            shape = [d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape]
            out.append((arg.name, ORT_TYPES[arg.type], shape))
        return out

    return tensors(session.get_inputs()), tensors(session.get_outputs())


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def complete_config(self, config: object, version_dir: object) -> None:
        """Triton's auto-complete for ONNX: inputs, outputs and max_batch_size the config
        leaves out, read from the version's model file. Raises INVALID_ARG saying why not.
        Control plane: called once per model version load, off the loop."""
        path = version_dir / config.default_model_filename  # type: ignore[attr-defined,operator]
        if not path.exists():
            raise invalid_arg(f"model file '{path}' does not exist")
        inputs, outputs = model_signature(path)
        model_config.complete_from_model(config, inputs, outputs)

    def load(self, spec: InstanceSpec) -> OnnxRuntimeInstance:
        return OnnxRuntimeInstance(spec)
