"""Request checks against a model's signature, with Triton's messages. Pure functions:
the scheduler runs them on what it queues, a frontend on what it sends a host directly."""

from __future__ import annotations

from despina.common import dtypes
from despina.common import messages as m
from despina.common.errors import invalid_arg


def _shape_str(shape: object) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"  # type: ignore[attr-defined]


def check_request(sig: m.Signature, req: m.Infer, buffers: list) -> None:
    """Raise INVALID_ARG naming what to fix when ``req`` does not fit the model: among
    the rest, a shape whose non-zero dimensions span more than ``dtypes.MAX_ELEMENTS``
    and a byte size that is not the shape's (both with Python ints: no overflow).
    ``buffers`` align with ``req.inputs``: inline bytes, or None for a ref (its size)."""
    name = sig.name
    max_batch = sig.max_batch_size
    batch = -1
    seen = set()
    for tensor, buf in zip(req.inputs, buffers):
        spec = sig.inputs.get(tensor.name)
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
        # Python ints: a count past 2**64 is a number, not an overflow. A shape numpy
        # can't build ([0, 2**62]) is refused here too, whichever frontend sent it.
        count = dtypes.element_count(shape)
        if count > dtypes.MAX_ELEMENTS or not count:
            dtypes.check_shape(tensor.name, shape, count)
        item = dtypes.item_size(datatype)
        expected_bytes = item * count if item else -1
        actual = len(buf) if buf is not None else tensor.ref.size  # type: ignore[union-attr]
        if expected_bytes >= 0 and actual != expected_bytes:
            raise invalid_arg(
                f"input byte size mismatch for input '{tensor.name}' for model '{name}'. "
                f"Expected {expected_bytes}, got {actual}"
            )
    if len(seen) != len(sig.required) or any(r not in seen for r in sig.required):
        missing = [r for r in sig.required if r not in seen]
        if missing:
            raise invalid_arg(
                f"expected {len(sig.required)} inputs but got {len(seen)} inputs "
                f"for model '{name}'. Got input(s) {sorted(seen)}, but missing required "
                f"input(s) {missing}. Please provide all required input(s)."
            )
    for out in req.outputs:
        if out not in sig.outputs:
            raise invalid_arg(f"unexpected inference output '{out}' for model '{name}'")
    if len(req.outputs) > 1 and len(set(req.outputs)) != len(req.outputs):
        twice = next(o for i, o in enumerate(req.outputs) if o in req.outputs[:i])
        raise invalid_arg(f"Duplicate output name '{twice}' is not allowed in a request")
