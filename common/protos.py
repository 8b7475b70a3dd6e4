"""Triton's generated protobuf modules (``tritonclient.grpc.model_config_pb2`` and
``service_pb2``), without what importing them through their package costs.

``tritonclient/grpc/__init__.py`` imports grpc, the gRPC client, numpy and ml_dtypes
(~35 MiB of RSS and ~0.1 s a process); the generated modules need only protobuf. This
loads each module's file directly and registers it under its canonical name, so every
user shares one module (and one set of message classes) with a later ``import
tritonclient.grpc`` in the same process: that package's ``from tritonclient.grpc import
model_config_pb2, service_pb2`` finds them in ``sys.modules``.

Use ``from despina.common.protos import model_config_pb2, service_pb2`` in Despina's
services; ``service_pb2_grpc`` (which imports grpc) is for clients and tests.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

_PACKAGE = "tritonclient.grpc"


def _load(name: str) -> ModuleType:
    full = f"{_PACKAGE}.{name}"
    module = sys.modules.get(full)
    if module is not None:
        return module
    package = importlib.util.find_spec("tritonclient")  # its __init__ imports nothing
    locations = package.submodule_search_locations if package is not None else None
    spec = None
    if locations:
        path = os.path.join(list(locations)[0], "grpc", f"{name}.py")
        spec = importlib.util.spec_from_file_location(full, path)
    if spec is None or spec.loader is None:
        return importlib.import_module(full)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    # service_pb2 runs "from tritonclient.grpc import model_config_pb2", which would run
    # the package's heavy __init__: while it loads, a bare stand-in answers for the
    # package, and it is gone again before anything else can import the real one.
    stand_in = None
    if _PACKAGE not in sys.modules:
        stand_in = ModuleType(_PACKAGE)
        stand_in.__path__ = [os.path.dirname(spec.origin or "")]
        stand_in.model_config_pb2 = sys.modules.get(f"{_PACKAGE}.model_config_pb2")  # type: ignore[attr-defined]
        sys.modules[_PACKAGE] = stand_in
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[full]
        raise
    finally:
        if stand_in is not None and sys.modules.get(_PACKAGE) is stand_in:
            del sys.modules[_PACKAGE]
    parent = sys.modules.get(_PACKAGE)
    if parent is not None:
        setattr(parent, name, module)
    return module


model_config_pb2 = _load("model_config_pb2")


def __getattr__(name: str) -> ModuleType:
    # service_pb2 is loaded on first use: only the frontend needs it.
    if name == "service_pb2":
        return _load(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
