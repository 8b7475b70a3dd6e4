"""Config auto-complete, the scheduler's side: adopt the config a backend host completed.

Triton's backends complete a model's config when they load it (ONNX Runtime from the
graph, the Python backend from the model's ``auto_complete_config``), and so do
Despina's backend hosts: the scheduler reads the repository, places the model with the
config as written (a folder without ``config.pbtxt`` gets a minimal one, see
``common/model_config.load``), and the host that loads it sends the completed config
back in its ``LoadResult``. ``adopt`` makes that config the model's before any of its
instances serves: it then drives request validation (the signature), ``/config`` and
the metadata. Under ``--strict-model-config=true`` an incomplete config never gets here
(``model_config.load`` refuses it).
"""

from __future__ import annotations

import logging

from despina.common import control as c
from despina.common import messages as m
from despina.common import model_config
from despina.common.errors import ServerError
from despina.common.model_config import ModelConfig
from despina.services.scheduler.repository import Model

log = logging.getLogger("despina.scheduler")


def signature(name: str, config: ModelConfig) -> m.Signature:
    """What a request to the model must look like, from its config."""
    return m.Signature(
        name,
        config.max_batch_size,
        {io.name: (model_config.datatype(io), [int(d) for d in io.dims]) for io in config.input},
        [io.name for io in config.input if not io.optional],
        [io.name for io in config.output],
    )


def adopt(model: Model, completed: bytes) -> str:
    """Make ``completed`` (a serialized ModelConfig a host sent in its LoadResult) the
    model's config, config record and signature. Returns '' when adopted, else why the
    completed config cannot be used (the caller fails the load with it). Loop only."""
    config = ModelConfig()
    try:
        config.ParseFromString(completed)
        model_config.validate(config)
    except ServerError as exc:
        return f"the completed config is not valid: {exc.message}"
    except Exception as exc:  # protobuf's DecodeError
        return f"the completed config could not be read: {exc}"
    if config.name != model.name:
        return f"the completed config names model '{config.name}', not '{model.name}'"
    if model.config is not None and model.config.SerializeToString() == completed:
        return ""
    model.config = config
    model.config_record = c.ModelConfig(model_config.config_json(config), completed)
    model.signature = signature(model.name, config)
    log.info(
        "model '%s': config auto-completed by its backend (%d input(s), %d output(s), "
        "max_batch_size %d)",
        model.name,
        len(config.input),
        len(config.output),
        config.max_batch_size,
    )
    return ""
