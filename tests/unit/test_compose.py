"""compose.yaml is checked by parsing (no Docker engine runs here): every service's
command must parse with that service's own flags, and they must agree on endpoints."""

from __future__ import annotations

import argparse
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
    name, *rest = command
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
