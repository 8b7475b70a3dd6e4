"""Request checks against the model's config, with Triton's messages. Pure functions."""

from __future__ import annotations

from despina.common import dtypes
from despina.common import messages as m
from despina.common.errors import Code, ServerError, invalid_arg, unavailable
from despina.services.scheduler.repository import Model


def _shape_str(shape: object) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"  # type: ignore[attr-defined]


def check_request(model: Model, req: m.Infer, buffers: list) -> None:
    """Raise INVALID_ARG naming what to fix when ``req`` does not fit ``model``."""
    config = model.config
    assert config is not None
    name = model.name
    max_batch = config.max_batch_size
    batch = -1
    seen = set()
    for tensor, buf in zip(req.inputs, buffers):
        spec = model.inputs.get(tensor.name)
        if spec is None:
            raise invalid_arg(f"unexpected inference input '{tensor.name}' for model '{name}'")
        if tensor.name in seen:
            raise invalid_arg(f"input '{tensor.name}' is given more than once for model '{name}'")
        seen.add(tensor.name)
        datatype, dims = spec
        if tensor.datatype != datatype:
            raise invalid_arg(
                f"inference input '{tensor.name}' data-type is '{tensor.datatype}', but model "
                f"'{name}' expects '{datatype}'"
            )
        shape = tensor.shape
        expected = ([-1] if max_batch > 0 else []) + list(dims)
        if (
            len(shape) != len(expected)
            or any(e != -1 and e != s for e, s in zip(expected, shape))
            or any(s < 0 for s in shape)
        ):
            raise invalid_arg(
                f"unexpected shape for input '{tensor.name}' for model '{name}'. Expected "
                f"{_shape_str(expected)}, got {_shape_str(shape)}. NOTE: Setting a non-zero "
                "max_batch_size in the model config requires a batch dimension to be "
                "prepended to each input shape. If you want to specify the full shape "
                "including the batch dim in your input dims config, try setting "
                "max_batch_size to zero. See the model configuration docs for more info "
                "on max_batch_size."
                if max_batch > 0
                else f"unexpected shape for input '{tensor.name}' for model '{name}'. "
                f"Expected {_shape_str(expected)}, got {_shape_str(shape)}."
            )
        if max_batch > 0:
            if shape[0] > max_batch:
                raise invalid_arg(
                    f"inference request batch-size must be <= {max_batch} for '{name}'"
                )
            if batch == -1:
                batch = shape[0]
            elif shape[0] != batch:
                raise invalid_arg(
                    f"input '{tensor.name}' batch size {shape[0]} does not match other "
                    f"inputs' batch size {batch} for model '{name}'"
                )
        expected_bytes = dtypes.byte_size(datatype, shape)
        actual = len(buf) if buf is not None else tensor.ref.size  # type: ignore[union-attr]
        if expected_bytes >= 0 and actual != expected_bytes:
            raise invalid_arg(
                f"input byte size mismatch for input '{tensor.name}' for model '{name}'. "
                f"Expected {expected_bytes}, got {actual}"
            )
    if len(seen) != len(model.required_inputs) or any(r not in seen for r in model.required_inputs):
        missing = [r for r in model.required_inputs if r not in seen]
        if missing:
            raise invalid_arg(
                f"expected {len(model.required_inputs)} inputs but got {len(seen)} inputs "
                f"for model '{name}'. Got input(s) {sorted(seen)}, but missing required "
                f"input(s) {missing}. Please provide all required input(s)."
            )
    for out in req.outputs:
        if out not in model.outputs:
            raise invalid_arg(f"unexpected inference output '{out}' for model '{name}'")


def resolve_version(model: Model, version: str) -> str:
    """The version a request runs on; NOT_FOUND / UNAVAILABLE as Triton says them."""
    if model.config is None:
        raise ServerError(
            Code.UNAVAILABLE,
            f"Request for unknown model: '{model.name}' has no available versions ({model.error})",
        )
    if not version:
        v = model.default_version()
        if v is None:
            raise _unavailable(model)
        return v
    mv = model.versions.get(version)
    if mv is None:
        raise ServerError(
            Code.NOT_FOUND,
            f"Request for unknown model: '{model.name}' version {version} is not found",
        )
    if mv.state.value != "READY":
        raise _unavailable(model, version)
    return version


def _unavailable(model: Model, version: str = "") -> ServerError:
    reasons = "; ".join(mv.reason for mv in model.versions.values() if mv.reason)
    which = f"version {version} is not ready" if version else "has no available versions"
    return unavailable(
        f"Request for unknown model: '{model.name}' {which}" + (f" ({reasons})" if reasons else "")
    )
