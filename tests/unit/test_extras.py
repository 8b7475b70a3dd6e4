"""Installs by need: the base install serves ONNX and Python models, each other backend is
an extra, and a backend host whose framework's module cannot be imported stops with a
message naming the install that adds it. The missing module is made unimportable in a
fresh interpreter (``sys.modules[name] = None``: a real ImportError for any import)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from despina.common.frameworks import EXTRAS, FRAMEWORKS, missing_extra

ROOT = Path(__file__).resolve().parents[2]


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(specs: list[str]) -> set[str]:
    return {s.split(">")[0].split("<")[0].split("=")[0].split("[")[0] for s in specs}


def test_the_base_install_runs_onnx_and_python_models_only():
    project = _project()
    base = _names(project["dependencies"])
    assert "onnxruntime" in base
    assert not base & {"torch", "onnxruntime-gpu", "cupy-cuda12x", "tensorrt"}
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    assert extras["pytorch"] == {"torch"}
    assert extras["gpu"] == {"onnxruntime-gpu", "cupy-cuda12x"}
    assert extras["tensorrt"] == {"tensorrt"}
    # the suite builds TorchScript models: the test extra pulls the pytorch one
    assert "despina[pytorch,loadtest,otel]" in project["optional-dependencies"]["test"]


def test_every_extra_a_message_names_exists():
    extras = _project()["optional-dependencies"]
    for _module, _what, install in EXTRAS.values():
        if "despina[" in install:
            assert install.split("[")[1].split("]")[0] in extras, install


def test_present_modules_are_not_reported_missing():
    # this venv has ONNX Runtime (CPU or GPU build); python needs nothing beyond the base
    assert missing_extra("onnxruntime") is None
    assert missing_extra("python") is None
    assert set(EXTRAS) <= set(FRAMEWORKS)


def _make_backend_without(module: str, framework: str) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        "from despina.services.backend_host.__main__ import make_backend\n"
        "from despina.common.errors import ServerError\n"
        "try:\n"
        f"    make_backend({framework!r})\n"
        "except ServerError as exc:\n"
        "    print(exc.code.name, exc.message, sep='|')\n"
        "else:\n"
        "    print('loaded')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )


@pytest.mark.parametrize(
    ("module", "framework", "message"),
    [
        ("torch", "pytorch", "the pytorch backend needs PyTorch: pip install 'despina[pytorch]'"),
        (
            "tensorrt",
            "tensorrt",
            "the tensorrt backend needs TensorRT: pip install 'despina[tensorrt]'",
        ),
        (
            "onnxruntime",
            "onnxruntime",
            "the onnxruntime backend needs ONNX Runtime: pip install onnxruntime",
        ),
    ],
)
def test_a_missing_extra_is_named_when_its_backend_is_made(module, framework, message):
    assert _make_backend_without(module, framework).stdout.strip() == f"UNSUPPORTED|{message}"


def test_the_backend_host_command_stops_naming_the_extra():
    """`despina backend-host --framework pytorch` without PyTorch: exit 2 and the message in
    its log, before it ever reaches for the scheduler."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from despina.services.cli import main\n"
        "main(['backend-host', '--framework', 'pytorch', '--scheduler', 'tcp://127.0.0.1:9'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "the pytorch backend needs PyTorch: pip install 'despina[pytorch]'" in proc.stderr
