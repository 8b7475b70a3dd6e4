"""config.pbtxt -> ``ModelConfig`` protobuf (Triton's own schema), defaults, validation,
and Triton's JSON renderings of config and metadata.

The proto is the source of truth: parsed once with ``google.protobuf.text_format`` into
``tritonclient.grpc.model_config_pb2.ModelConfig``, completed with Triton's defaults,
then treated as frozen.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from google.protobuf import descriptor, json_format, text_format

from despina.common import dtypes, frameworks
from despina.common.errors import invalid_arg
from despina.common.protos import model_config_pb2 as mc
from despina.common.stats import FIRST_RESPONSE_BOUNDS_MS, FIRST_RESPONSE_HISTOGRAM

log = logging.getLogger("despina.config")

# The most buckets a model's first-response histogram may have (model_metrics): every
# scrape writes each of them per model version.
MAX_HISTOGRAM_BUCKETS = 64

if TYPE_CHECKING:
    ModelConfig = Any  # the generated protobuf classes carry no type information
else:
    ModelConfig = mc.ModelConfig

FRAMEWORKS = frameworks.FRAMEWORKS


def parse_text(text: str, source: str = "config.pbtxt") -> ModelConfig:
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise invalid_arg(f"failed to parse {source}: {exc}") from None
    return config


# Off under --strict-model-config=true / --disable-auto-complete-config: set once by the
# scheduler at start (``set_auto_complete``), read by ``load`` when not told.
_AUTO_COMPLETE = True


def set_auto_complete(enabled: bool) -> None:
    """The process-wide default of ``load``'s ``auto_complete`` (the scheduler's flag)."""
    global _AUTO_COMPLETE
    _AUTO_COMPLETE = enabled


def load(model_dir: Path, *, auto_complete: bool | None = None) -> ModelConfig:
    """Read and complete ``<model_dir>/config.pbtxt``. Raises INVALID_ARG saying why.

    With ``auto_complete`` (Triton's default; off under ``--strict-model-config=true`` or
    ``--disable-auto-complete-config``) a missing file is a minimal config that the
    backend host completes from the model file at load, and a config that declares no
    inputs or outputs is left for it to complete too (``needs_completion``). Without it,
    both are refused here with the flag named."""
    if auto_complete is None:
        auto_complete = _AUTO_COMPLETE
    path = model_dir / "config.pbtxt"
    try:
        text = path.read_text()
    except FileNotFoundError:
        if not auto_complete:
            raise invalid_arg(
                f"model '{model_dir.name}' has no config.pbtxt, and auto-complete is disabled "
                "(--disable-auto-complete-config or --strict-model-config=true): a model "
                "configuration file is required"
            ) from None
        text = ""
    config = parse_text(text, str(path))
    complete(config, model_dir)
    if not auto_complete and needs_completion(config):
        raise invalid_arg(
            f"model '{config.name}': {path} declares no "
            f"{'input' if not config.input else 'output'}, and auto-complete is disabled "
            "(--disable-auto-complete-config or --strict-model-config=true): declare every "
            "input and output"
        )
    validate(config)
    return config


def needs_completion(config: ModelConfig) -> bool:
    """True when the config leaves inputs or outputs for the backend to fill from the
    model file (Triton's auto-complete)."""
    return not config.input or not config.output


def framework_of(config: ModelConfig, model_dir: Path | None = None) -> str:
    if config.backend:
        try:
            return frameworks.BACKENDS[config.backend]
        except KeyError:
            raise invalid_arg(
                f"model '{config.name}': backend '{config.backend}' is not supported "
                f"(supported: {', '.join(frameworks.BACKENDS)})"
            ) from None
    if config.platform:
        try:
            return frameworks.PLATFORMS[config.platform]
        except KeyError:
            raise invalid_arg(
                f"model '{config.name}': platform '{config.platform}' is not supported "
                f"(supported: {', '.join(frameworks.PLATFORMS)})"
            ) from None
    if model_dir is not None:
        framework = frameworks.from_model_file(model_dir)
        if framework is not None:
            return framework
    raise invalid_arg(
        f"model '{config.name}': config.pbtxt names no backend or platform and no model "
        "file tells which framework runs it"
    )


def complete(config: ModelConfig, model_dir: Path) -> None:
    """Fill what Triton fills when a field is left out."""
    if not config.name:
        config.name = model_dir.name
    elif config.name != model_dir.name:
        raise invalid_arg(
            f"model name '{config.name}' in config.pbtxt does not match its folder "
            f"'{model_dir.name}'"
        )
    framework = framework_of(config, model_dir)
    if framework == "python":
        config.backend = "python"
    else:
        if not config.platform:
            config.platform = frameworks.CANONICAL_PLATFORM[framework]
        if not config.backend:
            config.backend = framework
    if not config.default_model_filename:
        config.default_model_filename = frameworks.DEFAULT_FILENAMES[framework]
    if not config.instance_group:
        config.instance_group.add()
    for i, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{i}"
        if group.count < 1:
            group.count = 1
        if group.kind == mc.ModelInstanceGroup.KIND_AUTO:
            group.kind = mc.ModelInstanceGroup.KIND_CPU
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1


# What auto-complete sets max_batch_size to when the model file shows a batch dimension
# (Triton's --backend-config=default-max-batch-size, 4 unless given).
DEFAULT_MAX_BATCH_SIZE = 4

Tensor = tuple[str, str, list[int]]  # name, Triton data type ("FP32"), shape (-1: dynamic)


def complete_from_model(
    config: ModelConfig,
    inputs: list[Tensor],
    outputs: list[Tensor],
    default_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> None:
    """Fill the inputs, outputs and max_batch_size a config leaves out from a model
    file's signature, as Triton's ONNX Runtime backend does: when the config declares no
    inputs or outputs and sets no max_batch_size, a first dimension that is dynamic in
    every input and output is the batch dimension (max_batch_size becomes
    ``default_max_batch_size``; Triton also adds ``dynamic_batching {}``, which Despina
    leaves to the config: the scheduler is chosen from the config as read); declared
    inputs and outputs are kept as written. Pure."""
    declared = {io.name for io in config.input} | {io.name for io in config.output}
    if not declared and config.max_batch_size == 0 and default_max_batch_size > 0:
        tensors = inputs + outputs
        if tensors and all(shape and shape[0] == -1 for _, _, shape in tensors):
            config.max_batch_size = default_max_batch_size
    skip = 1 if config.max_batch_size > 0 else 0
    for items, target in ((inputs, config.input), (outputs, config.output)):
        for name, dt, shape in items:
            if name in declared:
                continue
            io = target.add()
            io.name = name
            io.data_type = mc.DataType.Value(dtypes.to_config_type(dt))
            io.dims.extend([-1 if d is None or d < 0 else d for d in shape[skip:]] or [1])


def validate(config: ModelConfig) -> None:
    if config.max_batch_size < 0:
        raise invalid_arg(f"model '{config.name}': max_batch_size must be >= 0")
    seen: set[str] = set()
    for io in list(config.input) + list(config.output):
        if not io.name:
            raise invalid_arg(f"model '{config.name}': an input or output has no name")
        if io.data_type == mc.TYPE_INVALID:
            raise invalid_arg(f"model '{config.name}': '{io.name}' has no data_type")
        if any(d < -1 or d == 0 for d in io.dims) and not io.dims == [0]:
            raise invalid_arg(
                f"model '{config.name}': '{io.name}' has an invalid dimension in {list(io.dims)}"
            )
    for io in config.input:
        if io.name in seen:
            raise invalid_arg(f"model '{config.name}': input '{io.name}' is declared twice")
        seen.add(io.name)
    try:
        first_response_bounds(config)
    except ValueError as exc:
        raise invalid_arg(f"model '{config.name}': {exc}") from None


def warn_unused(config: ModelConfig) -> None:
    """Log what of ``config`` Triton would use and Despina does not (the scheduler, once
    per load)."""
    for control in config.model_metrics.metric_control:
        family = control.metric_identifier.family
        if family != FIRST_RESPONSE_HISTOGRAM:
            log.warning(
                "model '%s': model_metrics options for metric family '%s' are not used "
                "(only %s takes buckets)",
                config.name,
                family,
                FIRST_RESPONSE_HISTOGRAM,
            )


def first_response_bounds(config: ModelConfig) -> list[float]:
    """The bucket bounds (ms) of a model's first-response histogram: its config's
    ``model_metrics`` ``histogram_options`` for Triton's family, else Triton's defaults
    (options for other families are not read: ``warn_unused`` says so). Raises ValueError
    for buckets a histogram cannot take (none, not increasing, not finite)."""
    bounds: list[float] = list(FIRST_RESPONSE_BOUNDS_MS)
    for control in config.model_metrics.metric_control:
        if control.metric_identifier.family != FIRST_RESPONSE_HISTOGRAM:
            continue
        given = list(control.histogram_options.buckets)
        if len(given) > MAX_HISTOGRAM_BUCKETS:  # a config a load request may carry: bounded
            raise ValueError(
                f"model_metrics: {FIRST_RESPONSE_HISTOGRAM} takes at most "
                f"{MAX_HISTOGRAM_BUCKETS} buckets, got {len(given)}"
            )
        if not given or any(not math.isfinite(b) for b in given) or given != sorted(set(given)):
            raise ValueError(
                f"model_metrics: the buckets of {FIRST_RESPONSE_HISTOGRAM} must be finite "
                f"numbers in increasing order, got {given}"
            )
        bounds = given
    return bounds


def datatype(io: mc.ModelInput | mc.ModelOutput) -> str:
    """Triton's protocol data type name (``FP32``) of a config input or output."""
    return dtypes.from_config_type(mc.DataType.Name(io.data_type))


def instance_count(config: ModelConfig) -> int:
    return sum(group.count for group in config.instance_group)


def _is_version(name: str) -> bool:
    """A version folder is a positive decimal number written without leading zeros."""
    return name.isascii() and name.isdigit() and name == str(int(name)) and int(name) > 0


def available_versions(config: ModelConfig, model_dir: Path) -> list[str]:
    """Version folders the version policy selects, as strings, newest first."""
    versions = sorted(
        (int(p.name) for p in model_dir.iterdir() if p.is_dir() and _is_version(p.name)),
        reverse=True,
    )
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        chosen = versions
    elif which == "specific":
        wanted = set(policy.specific.versions)
        chosen = [v for v in versions if v in wanted]
    else:
        chosen = versions[: max(policy.latest.num_versions, 1)]
    return [str(v) for v in chosen]


# --- JSON renderings ---------------------------------------------------------------------

_INT64_TYPES = {
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT64,
    descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
}


def _ints_as_numbers(value: object, desc: descriptor.Descriptor) -> object:
    """json_format writes 64-bit integers as strings; Triton writes numbers."""
    if not isinstance(value, dict):
        return value
    for key, item in value.items():
        field = desc.fields_by_name.get(key)
        if field is None:
            continue
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                if value_field.message_type is not None:
                    for k in item:
                        item[k] = _ints_as_numbers(item[k], value_field.message_type)
            elif isinstance(item, list):
                value[key] = [_ints_as_numbers(x, field.message_type) for x in item]
            else:
                value[key] = _ints_as_numbers(item, field.message_type)
        elif field.type in _INT64_TYPES:
            value[key] = [int(x) for x in item] if isinstance(item, list) else int(item)
    return value


def to_json_dict(config: ModelConfig) -> dict:
    raw = json_format.MessageToDict(
        config,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return _ints_as_numbers(raw, config.DESCRIPTOR)  # type: ignore[return-value]


def config_json(config: ModelConfig) -> bytes:
    return orjson.dumps(to_json_dict(config))


def metadata_json(config: ModelConfig, versions: list[str]) -> bytes:
    """The KServe v2 model metadata document (``GET /v2/models/{name}``)."""
    batch = [-1] if config.max_batch_size > 0 else []

    def tensors(items: object) -> list[dict]:
        return [
            {"name": io.name, "datatype": datatype(io), "shape": batch + [int(d) for d in io.dims]}
            for io in items  # type: ignore[attr-defined]
        ]

    platform = config.platform or config.backend
    return orjson.dumps(
        {
            "name": config.name,
            "versions": versions,
            "platform": platform,
            "inputs": tensors(config.input),
            "outputs": tensors(config.output),
        }
    )
