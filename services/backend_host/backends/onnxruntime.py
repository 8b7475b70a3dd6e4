"""ONNX Runtime backend: one ``InferenceSession`` per model instance.

CPU execution provider always; CUDA when the instance is KIND_GPU and the provider is
present. A batch of several requests is concatenated along the batch axis (one copy)
and the outputs split back; a batch of one runs on the request's own arrays.
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

    def _run(self, inputs: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        names = wanted or self.output_names
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


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def load(self, spec: InstanceSpec) -> OnnxRuntimeInstance:
        return OnnxRuntimeInstance(spec)
