"""The model repository: scan, parse each model's config, pick versions, and track
each model's lifecycle state. Pure bookkeeping: no sockets here.

A broken model never takes the others down: it is UNAVAILABLE with its reason, shown in
the repository index and the log.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from google.protobuf import json_format

from despina.common import control as c
from despina.common import messages as m
from despina.common import model_config
from despina.common.errors import ServerError, invalid_arg
from despina.common.model_config import ModelConfig

if TYPE_CHECKING:
    from despina.services.scheduler.interface import ModelScheduler

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
    # Which load of the model this is (services/scheduler/model_control.py): its
    # instances' indexes start at ``generation * messages.INSTANCE_STRIDE``.
    generation: int = 0
    # This load's per-version schedulers (the scheduler's table holds the live load's).
    schedulers: dict[str, ModelScheduler] = field(default_factory=dict)
    # What the folder looked like when read (``fingerprint``): poll mode reloads on change.
    fingerprint: str = ""
    # False once unloaded: placement starts no instances for it.
    wanted: bool = True
    # A folder this server wrote for file overrides (removed when the load retires).
    owned_dir: Path | None = None

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


def list_models(roots: list[Path]) -> dict[str, Path]:
    """Every model folder under each root, by name. Raises INVALID_ARG for a missing
    root or a model name found in two repositories (Triton refuses both too)."""
    found: dict[str, Path] = {}
    for root in roots:
        if not root.is_dir():
            raise invalid_arg(f"model repository '{root}' does not exist or is not a folder")
        for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if path.name in found:
                raise invalid_arg(
                    f"model '{path.name}' appears in more than one model repository "
                    f"({found[path.name].parent} and {root})"
                )
            found[path.name] = path
    return found


def scan(roots: list[Path], names: set[str] | None = None) -> dict[str, Model]:
    """Read every model folder under each root (only those named in ``names`` when
    given). Models whose config cannot be used are kept, UNAVAILABLE, with the reason.
    Raises as ``list_models``."""
    return {
        name: read_model(path)
        for name, path in list_models(roots).items()
        if names is None or name in names
    }


def fingerprint(path: Path) -> str:
    """A digest of what a model folder holds: every folder's relative path, and every
    file's relative path, size and modification time (content is not read: a model file may be gigabytes). Poll mode
    compares it to see a change; '' when the folder is gone."""
    if not path.is_dir():
        return ""
    digest = hashlib.sha256()
    try:
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            digest.update(f"{os.path.relpath(dirpath, path)}/\n".encode())  # empty ones too
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                rel = os.path.relpath(full, path)
                digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
        return ""
    return digest.hexdigest()


def read_model(path: Path, config_json: str | None = None, name: str = "") -> Model:
    """The model in folder ``path`` (named ``name``, default the folder's name), with
    its config from ``config.pbtxt`` or, given, from ``config_json`` (a load's
    ``config`` override, Triton's JSON form). Never raises: a config that cannot be
    used leaves the model UNAVAILABLE with the reason in ``error``."""
    name = name or path.name
    model = Model(name=name, path=path, fingerprint=fingerprint(path))
    try:
        if config_json is None:
            config = model_config.load(path)
        else:
            config = _config_from_json(config_json, path, name)
        model.framework = model_config.framework_of(config, path)
        versions = model_config.available_versions(config, path)
        if not versions:
            raise invalid_arg(f"model '{path.name}' has no version folder to load")
    except ServerError as exc:
        model.error = exc.message
        log.error("model '%s' is unavailable: %s", name, exc.message)
        return model
    model_config.warn_unused(config)
    model.config = config
    model.config_record = c.ModelConfig(
        model_config.config_json(config), config.SerializeToString()
    )
    model.signature = m.Signature(
        name,
        config.max_batch_size,
        {io.name: (model_config.datatype(io), [int(d) for d in io.dims]) for io in config.input},
        [io.name for io in config.input if not io.optional],
        [io.name for io in config.output],
    )
    model.versions = {v: ModelVersion(name, v) for v in versions}
    return model


def _config_from_json(text: str, path: Path, name: str) -> ModelConfig:
    """A load's ``config`` override (Triton's JSON of a ModelConfig), completed and
    checked as a ``config.pbtxt`` would be. Raises INVALID_ARG saying why."""
    config = ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise invalid_arg(f"failed to load '{name}': the 'config' parameter: {exc}") from None
    if config.name and config.name != name:
        raise invalid_arg(
            f"failed to load '{name}': the 'config' parameter names model '{config.name}'"
        )
    config.name = path.name  # complete() checks it against the folder
    model_config.complete(config, path)
    config.name = name
    model_config.validate(config)
    return config


def write_override_files(name: str, files: dict[str, str], parent: Path) -> Path:
    """A new model folder under ``parent`` (this server's), holding ``files``: a load's
    ``file:<version>/<name>`` parameters (relative path -> base64 content). Every path
    must stay inside the folder: no absolute path, no ``..``, no empty segment. Raises
    INVALID_ARG naming the parameter, and leaves nothing behind then."""
    checked: list[tuple[PurePosixPath, bytes]] = []
    for rel, content in files.items():
        pure = PurePosixPath(rel)
        if (
            not rel
            or rel.startswith("/")
            or "\\" in rel
            or "\0" in rel
            or any(part in ("", ".", "..") for part in rel.split("/"))
        ):
            raise invalid_arg(
                f"failed to load '{name}': file override 'file:{rel}' must be a relative path "
                "inside the model folder (no '..', no absolute path)"
            )
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise invalid_arg(
                f"failed to load '{name}': file override 'file:{rel}' is not valid base64"
            ) from None
        checked.append((pure, data))
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    target = folder / name
    target.mkdir()
    for pure, data in checked:
        dest = target.joinpath(*pure.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    return target
