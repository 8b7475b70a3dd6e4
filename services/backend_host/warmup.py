"""Model warmup (config's ``model_warmup``): run each sample on a freshly loaded instance
before the host reports it loaded, as Triton does, so the first client request does not
pay for lazy initialisation.

A sample is ``batch_size`` requests (each of batch 1 when the model batches) executed
together as one batch, ``count`` times (at least once). Each input is zeros
(``zero_data``), random values (``random_data``) or the raw bytes of
``<model>/warmup/<input_data_file>`` (BYTES tensors in Triton's length-prefixed form).
Control plane only: runs once per instance load, on the load thread, never on the
request path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from despina.common import dtypes
from despina.common.errors import ServerError, internal, invalid_arg
from despina.services.backend_host.backend import (
    ExecRequest,
    InstanceSpec,
    ModelInstance,
    config_dict,
)

log = logging.getLogger("despina.backend_host")


def samples(config: dict, model_dir: Path) -> list[tuple[str, int, list[dict[str, np.ndarray]]]]:
    """Each warmup sample of a config in Triton's JSON form: (name, count, the inputs of
    each of its requests). Raises INVALID_ARG naming the sample and input when one
    cannot be built (unknown type, bad dims, a data file missing or of the wrong size)."""
    batched = int(config.get("max_batch_size", 0)) > 0
    out = []
    for i, sample in enumerate(config.get("model_warmup", ())):
        name = sample.get("name") or f"sample {i}"
        batch_size = max(int(sample.get("batch_size", 0)), 1)
        if batched and batch_size > int(config["max_batch_size"]):
            raise invalid_arg(
                f"warmup sample '{name}': batch_size {batch_size} exceeds the model's "
                f"max_batch_size {config['max_batch_size']}"
            )
        inputs = {
            input_name: _tensor(name, input_name, spec, batched, model_dir)
            for input_name, spec in (sample.get("inputs") or {}).items()
        }
        requests = [dict(inputs) for _ in range(batch_size if batched else 1)]
        out.append((name, max(int(sample.get("count", 0)), 1), requests))
    return out


def _tensor(sample: str, name: str, spec: dict, batched: bool, model_dir: Path) -> np.ndarray:
    where = f"warmup sample '{sample}', input '{name}'"
    datatype = dtypes.from_config_type(spec.get("data_type", "TYPE_INVALID"))
    if not dtypes.is_known(datatype):
        raise invalid_arg(f"{where}: data_type '{spec.get('data_type')}' is not valid")
    dims = [int(d) for d in spec.get("dims", ())]
    if any(d < 0 for d in dims):
        raise invalid_arg(f"{where}: dims {dims} must be fixed (no -1) for warmup data")
    shape = ([1] if batched else []) + dims
    count = int(np.prod(shape, dtype=np.int64))
    if "input_data_file" in spec:
        path = model_dir / "warmup" / spec["input_data_file"]
        given = Path(spec["input_data_file"])
        if given.is_absolute() or ".." in given.parts:
            raise invalid_arg(f"{where}: input_data_file must name a file in {path.parent}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise invalid_arg(f"{where}: cannot read '{path}': {exc.strerror}") from None
        if datatype == "BYTES":
            return dtypes.deserialize_bytes(data, count).reshape(shape)
        expected = count * dtypes.item_size(datatype)
        if len(data) != expected:
            raise invalid_arg(
                f"{where}: '{path}' holds {len(data)} bytes, the input needs {expected}"
            )
        return np.frombuffer(data, dtype=dtypes.to_numpy(datatype)).reshape(shape)
    if datatype == "BYTES":
        value = b"" if spec.get("zero_data", not spec.get("random_data")) else b"warmup"
        return np.array([value] * count, dtype=object).reshape(shape)
    dtype = dtypes.to_numpy(datatype)
    if spec.get("random_data"):
        rng = np.random.default_rng()
        if dtype == np.bool_:
            return rng.integers(0, 2, shape).astype(np.bool_)
        if np.issubdtype(dtype, np.integer):
            return rng.integers(0, 100, shape).astype(dtype)
        return rng.random(shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)


def run(instance: ModelInstance, spec: InstanceSpec) -> None:
    """Run the config's warmup samples on ``instance``. Raises ServerError (INVALID_ARG
    for a sample that cannot be built, INTERNAL for one the model fails) with the
    sample named: the caller reports the load failed, so the model is UNAVAILABLE with
    that reason. Blocking: call it where the instance was loaded (off the loop)."""
    config = config_dict(spec.config)
    if not config.get("model_warmup"):
        return
    for name, count, inputs in samples(config, spec.model_dir):
        requests = [ExecRequest("", tensors, []) for tensors in inputs]
        for _ in range(count):
            try:
                responses = instance.execute(requests)
            except ServerError as exc:
                raise ServerError(
                    exc.code, f"warmup sample '{name}' failed: {exc.message}"
                ) from None
            except Exception as exc:
                raise internal(
                    f"warmup sample '{name}' failed: {type(exc).__name__}: {exc}"
                ) from None
            for response in responses:
                if response.error is not None:
                    raise ServerError(
                        response.error.code,
                        f"warmup sample '{name}' failed: {response.error.message}",
                    )
        log.info(
            "warmed up '%s' instance %d with sample '%s' (%d run(s), %d request(s) each)",
            spec.model_name,
            spec.instance_index,
            name,
            count,
            len(requests),
        )
