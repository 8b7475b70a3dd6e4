"""The model repository: scan, parse each model's config, pick versions, and track
each model's lifecycle state. Pure bookkeeping: no sockets here.

A broken model never takes the others down: it is UNAVAILABLE with its reason, shown in
the repository index and the log.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path

from despina.common import control as c
from despina.common import messages as m
from despina.common import model_config
from despina.common.errors import ServerError, invalid_arg
from despina.common.model_config import ModelConfig

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    UNKNOWN = "UNKNOWN"
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADING = "UNLOADING"


@dataclass
class ModelVersion:
    name: str
    version: str
    state: State = State.LOADING
    reason: str = ""


@dataclass
class Model:
    name: str
    path: Path
    config: ModelConfig | None = None
    framework: str = ""
    error: str = ""  # why the config itself could not be used
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    # The config as the control plane returns it (Triton's JSON, and the protobuf).
    config_record: c.ModelConfig | None = None
    # What requests must look like (common/validate.py checks them against it).
    signature: m.Signature | None = None

    def ready_versions(self) -> list[str]:
        return [v for v, mv in self.versions.items() if mv.state is State.READY]

    def metadata(self) -> c.ModelMetadata:
        """The KServe v2 model metadata (``GET /v2/models/{name}``), with the versions
        ready now."""
        config = self.config
        assert config is not None
        batch = [-1] if config.max_batch_size > 0 else []

        def tensors(items: object) -> list[c.TensorMetadata]:
            return [
                c.TensorMetadata(
                    io.name, model_config.datatype(io), batch + [int(d) for d in io.dims]
                )
                for io in items  # type: ignore[attr-defined]
            ]

        return c.ModelMetadata(
            config.name,
            self.ready_versions(),
            config.platform or config.backend,
            tensors(config.input),
            tensors(config.output),
        )

    def default_version(self) -> str | None:
        ready = self.ready_versions()
        return max(ready, key=int) if ready else None


def scan(roots: list[Path]) -> dict[str, Model]:
    """Read every model folder under each root. Models whose config cannot be used are
    kept, UNAVAILABLE, with the reason. Raises INVALID_ARG for a missing root or a model
    name found in two repositories (Triton refuses both too)."""
    models: dict[str, Model] = {}
    for root in roots:
        if not root.is_dir():
            raise invalid_arg(f"model repository '{root}' does not exist or is not a folder")
        for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if path.name in models:
                raise invalid_arg(
                    f"model '{path.name}' appears in more than one model repository "
                    f"({models[path.name].path.parent} and {root})"
                )
            models[path.name] = read_model(path)
    return models


def read_model(path: Path) -> Model:
    model = Model(name=path.name, path=path)
    try:
        config = model_config.load(path)
        model.framework = model_config.framework_of(config, path)
        versions = model_config.available_versions(config, path)
        if not versions:
            raise invalid_arg(f"model '{path.name}' has no version folder to load")
    except ServerError as exc:
        model.error = exc.message
        log.error("model '%s' is unavailable: %s", path.name, exc.message)
        return model
    model.config = config
    model.config_record = c.ModelConfig(
        model_config.config_json(config), config.SerializeToString()
    )
    model.signature = m.Signature(
        path.name,
        config.max_batch_size,
        {io.name: (model_config.datatype(io), [int(d) for d in io.dims]) for io in config.input},
        [io.name for io in config.input if not io.optional],
        [io.name for io in config.output],
    )
    model.versions = {v: ModelVersion(path.name, v) for v in versions}
    return model
