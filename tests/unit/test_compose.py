"""compose.yaml is checked by parsing (deploy/compose-test.sh runs it for real, in
.ci/run): every service's command must parse with that service's own flags, and they must
agree on endpoints; the compose test's overlay, the Dockerfile's build arguments and
.dockerignore are checked the same way."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from despina.services.backend_host.__main__ import add_arguments as backend_arguments
from despina.services.frontend.__main__ import add_arguments as frontend_arguments
from despina.services.scheduler.__main__ import add_arguments as scheduler_arguments

ROOT = Path(__file__).resolve().parents[2]
PARSERS = {
    "scheduler": scheduler_arguments,
    "frontend": frontend_arguments,
    "backend-host": backend_arguments,
}


def parse(command: list[str]) -> tuple[str, argparse.Namespace]:
    # ${VAR:-default} as compose reads it with VAR unset
    name, *rest = (re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", arg) for arg in command)
    parser = argparse.ArgumentParser(exit_on_error=False, allow_abbrev=False)
    PARSERS[name](parser)
    return name, parser.parse_args(rest)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_every_command_parses(compose):
    parsed = {svc: parse(spec["command"]) for svc, spec in compose["services"].items()}
    kinds = sorted(kind for kind, _ in parsed.values())
    assert kinds.count("scheduler") == 1
    assert "frontend" in kinds and "backend-host" in kinds
    scheduler = next(args for kind, args in parsed.values() if kind == "scheduler")
    port = scheduler.endpoint.rsplit(":", 1)[1]
    host_port = scheduler.host_endpoint.rsplit(":", 1)[1]
    assert port != host_port
    for svc, (kind, args) in parsed.items():
        if kind == "frontend":
            assert args.scheduler == f"tcp://scheduler:{host_port}", svc
            assert args.advertise_endpoint.startswith(f"tcp://{svc}:"), svc
            assert (
                args.reply_endpoint.rsplit(":", 1)[1] == args.advertise_endpoint.rsplit(":", 1)[1]
            )
        if kind == "backend-host":
            assert args.scheduler == f"tcp://scheduler:{host_port}", svc


def test_one_backend_per_framework_the_repository_needs(compose):
    from despina.services.supervisor import frameworks_needed

    frameworks = {
        parse(spec["command"])[1].framework
        for spec in compose["services"].values()
        if spec["command"][0] == "backend-host"
    }
    assert set(frameworks_needed([ROOT / "model_repository"])) <= frameworks


def test_shared_memory_is_shared(compose):
    services = compose["services"]
    assert services["scheduler"]["ipc"] == "shareable"
    for name, spec in services.items():
        if name != "scheduler":
            assert spec["ipc"] == "service:scheduler", name


def test_ports_as_triton(compose):
    assert "8000:8000" in compose["services"]["frontend"]["ports"]
    assert "8001:8001" in compose["services"]["frontend"]["ports"]


def test_the_compose_test_overlay_shares_the_hosts_dev_shm(compose):
    """deploy/compose/host-shm.yaml (deploy/compose-test.sh) changes only where /dev/shm
    comes from and lets the scheduler take client regions: same services, same endpoints."""
    overlay = yaml.safe_load((ROOT / "deploy" / "compose" / "host-shm.yaml").read_text())
    assert set(overlay["services"]) == set(compose["services"])
    for name, spec in overlay["services"].items():
        assert spec["ipc"] == "host", name
        assert spec["image"] == "${DESPINA_IMAGE:-despina:latest}", name
    _, base = parse(compose["services"]["scheduler"]["command"])
    _, test = parse(overlay["services"]["scheduler"]["command"])
    assert test.allow_client_shm is True and base.allow_client_shm is False
    assert (test.endpoint, test.host_endpoint) == (base.endpoint, base.host_endpoint)
    assert test.model_repository == base.model_repository


def dockerfile_args() -> dict[str, str]:
    args = {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ARG "):
            name, _, default = line[4:].partition("=")
            args[name] = default.strip('"')
    return args


def test_dockerfile_build_arguments_default_to_the_public_ones():
    args = dockerfile_args()
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["PIP_INDEX_URL"] == "https://pypi.org/simple"
    assert args["DESPINA_EXTRAS"] == "pytorch"
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT", "PIP_CONSTRAINT"):
        assert args[name] == "", name
    # The extras the image installs exist in pyproject.toml.
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert {"pytorch", "gpu"} <= set(extras)


def test_dockerignore_keeps_the_context_small():
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "build", "*.egg-info", "**/__pycache__", "loadtest"} <= patterns
    # What the Dockerfile copies is not ignored.
    for path in ("common", "services", "model_repository", "pyproject.toml", "README.md"):
        assert path not in patterns
    assert "deploy" not in patterns and "deploy/docker" not in patterns


def test_compose_test_script_is_valid_bash():
    import subprocess

    for script in (ROOT / "deploy" / "compose-test.sh", ROOT / ".ci" / "run"):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
