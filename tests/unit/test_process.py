"""common.process: ``call_forked`` computes in a child and keeps its imports there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from despina.common.errors import invalid_arg
from despina.common.process import call_forked


def _pid_and(value: int) -> tuple[int, int]:
    return os.getpid(), value * 2


def _fails() -> None:
    raise ValueError("no such model")


def _server_error() -> None:
    raise invalid_arg("bad config")  # ServerError does not unpickle: sent as text


def test_result_comes_from_a_child():
    pid, doubled = call_forked(_pid_and, 21)
    assert doubled == 42
    assert pid != os.getpid()


def test_exceptions_are_raised_here():
    with pytest.raises(ValueError, match="no such model"):
        call_forked(_fails)
    with pytest.raises(RuntimeError, match="ServerError: bad config"):
        call_forked(_server_error)


def test_imports_stay_in_the_child():
    code = (
        "import sys\n"
        "from despina.common.process import call_forked\n"
        "from despina.services.supervisor import frameworks_needed\n"
        "from pathlib import Path\n"
        "print(call_forked(frameworks_needed, [Path(sys.argv[1])]))\n"
        "print('google.protobuf' in sys.modules)\n"
    )
    repo = os.path.join(os.path.dirname(__file__), "..", "..", "model_repository")
    out = subprocess.run(
        [sys.executable, "-c", code, repo], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert "python" in out[0] and "onnxruntime" in out[0]
    assert out[1] == "False"
