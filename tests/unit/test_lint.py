"""The repository passes its linters: ruff (lint and format) and mypy, as configured in
pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "args",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy", "common", "services"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_linter_passes(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"`{' '.join(args)}` exited with {result.returncode}:\n{result.stdout}{result.stderr}"
    )
