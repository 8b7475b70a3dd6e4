"""The Backend protocol: what a framework must provide to run in a backend host.

A backend loads model instances; an instance executes a list of requests (a batch) and
returns one response per request, in order. Inputs are numpy arrays (views onto shared
memory or message frames where possible: treat them as read-only); BYTES tensors are
1-D-reshaped object arrays of ``bytes``. An instance is used by one thread at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from despina.common.errors import ServerError

ParamValue = bool | int | float | str


@dataclass(slots=True)
class ExecRequest:
    request_id: str  # the client's request id ("" when none was given)
    inputs: dict[str, np.ndarray]
    requested_outputs: list[str]  # empty: every output
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(slots=True)
class ExecResponse:
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: ServerError | None = None


# What a decoupled instance returns for a request it answers through its response
# sender (``Replies.send_part``), not with this execution's reply.
DEFERRED = ExecResponse()


@dataclass(slots=True)
class InstanceSpec:
    """Everything a backend needs to create one model instance."""

    model_name: str
    version: str
    model_dir: Path  # <repository>/<model>
    # model_config_pb2.ModelConfig, frozen after load; or that config in Triton's JSON
    # form (bytes) in a Python instance process, which does not load protobuf.
    config: object
    instance_index: int
    kind: str = "KIND_CPU"  # KIND_CPU | KIND_GPU | KIND_MODEL
    device_id: int = 0

    @property
    def version_dir(self) -> Path:
        return self.model_dir / self.version

    @property
    def instance_name(self) -> str:
        return f"{self.model_name}_{self.instance_index}"


class ModelInstance(Protocol):
    def execute(self, requests: list[ExecRequest]) -> list[ExecResponse]:
        """Run one batch. Raise ServerError to fail the whole batch; per-request
        failures go in ``ExecResponse.error``."""
        ...

    def unload(self) -> None: ...


class Backend(Protocol):
    name: str

    def load(self, spec: InstanceSpec) -> ModelInstance:
        """Create a working instance or raise ServerError saying why not."""
        ...


def config_json(config: object) -> bytes:
    """Triton's JSON form of a model config (``GET .../config``, a Python model's
    ``args["model_config"]``): ``config`` itself when it is that JSON already, else
    rendered from the ``ModelConfig`` proto."""
    if isinstance(config, bytes):
        return config
    from despina.common import model_config

    return model_config.config_json(config)


def config_dict(config: object) -> dict:
    """The model config as a dict of Triton's JSON form: proto field names, every field
    present (enums by name, 64-bit integers as numbers), messages left unset absent."""
    import orjson

    return orjson.loads(config_json(config))
