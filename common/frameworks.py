"""Which backend host runs a model: the spellings of backends and platforms, and the
default model file of each framework. No protobuf here, so that processes which only
need these names (a Python instance process, ``despina backend-host``'s flags) do not
load it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# platform / backend spellings -> the framework of the backend host that runs them
PLATFORMS = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "tensorrt_plan": "tensorrt",
    "python": "python",
}
BACKENDS = {
    "onnxruntime": "onnxruntime",
    "pytorch": "pytorch",
    "tensorrt": "tensorrt",
    "python": "python",
}
DEFAULT_FILENAMES = {
    "onnxruntime": "model.onnx",
    "pytorch": "model.pt",
    "tensorrt": "model.plan",
    "python": "model.py",
}
CANONICAL_PLATFORM = {
    "onnxruntime": "onnxruntime_onnx",
    "pytorch": "pytorch_libtorch",
    "tensorrt": "tensorrt_plan",
}
FRAMEWORKS: tuple[str, ...] = tuple(DEFAULT_FILENAMES)
# framework -> (the module its backend imports, what it is, the install that provides it)
EXTRAS = {
    "onnxruntime": ("onnxruntime", "ONNX Runtime", "pip install onnxruntime"),
    "pytorch": ("torch", "PyTorch", "pip install 'despina[pytorch]'"),
    "tensorrt": ("tensorrt", "TensorRT", "pip install 'despina[tensorrt]'"),
}


def missing_extra(framework: str) -> str | None:
    """Why this install cannot run the framework's backend (its module is not importable,
    with the install that adds it), or None. Finds the module without importing it."""
    if framework not in EXTRAS:
        return None
    module, what, install = EXTRAS[framework]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it
        found = False
    return None if found else f"the {framework} backend needs {what}: {install}"


def from_model_file(model_dir: Path) -> str | None:
    """The framework whose default model file a version folder holds, if any."""
    for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        for framework, filename in DEFAULT_FILENAMES.items():
            if (version_dir / filename).exists():
                return framework
    return None
