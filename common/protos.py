"""Triton's generated ``model_config_pb2`` (``tritonclient.grpc.model_config_pb2``),
without what importing it through its package costs.

``tritonclient/grpc/__init__.py`` imports grpc, the gRPC client and numpy (~30 MiB of RSS
and ~0.1 s a process); the generated module itself needs only protobuf. This loads the
module's file directly and registers it under its canonical name, so every user shares
one module (and one set of message classes) with a later ``import tritonclient.grpc``
in the same process: that package's ``from tritonclient.grpc import model_config_pb2``
finds it in ``sys.modules``.

Use ``from despina.common.protos import model_config_pb2`` in code that runs in the
scheduler, the supervisor or a backend host; ``from tritonclient.grpc import
model_config_pb2`` gives the same module where the gRPC package is loaded anyway.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

_NAME = "tritonclient.grpc.model_config_pb2"


def _load() -> ModuleType:
    module = sys.modules.get(_NAME)
    if module is not None:
        return module
    package = importlib.util.find_spec("tritonclient")  # its __init__ imports nothing
    locations = package.submodule_search_locations if package is not None else None
    if not locations:
        from tritonclient.grpc import model_config_pb2 as imported

        return imported
    path = os.path.join(list(locations)[0], "grpc", "model_config_pb2.py")
    spec = importlib.util.spec_from_file_location(_NAME, path)
    if spec is None or spec.loader is None:
        from tritonclient.grpc import model_config_pb2 as imported

        return imported
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_NAME]
        raise
    parent = sys.modules.get("tritonclient.grpc")
    if parent is not None:
        parent.model_config_pb2 = module  # type: ignore[attr-defined]
    return module


model_config_pb2 = _load()
