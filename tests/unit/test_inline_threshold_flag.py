"""``despina serve --inline-threshold`` (and ``--busy-poll-us``) reaches every frontend and
backend host it starts, and each of them parses it with its own flags."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from despina.services import cli
from despina.services.backend_host.__main__ import add_arguments as backend_arguments
from despina.services.flags import BUSY_POLL_US, INLINE_THRESHOLD
from despina.services.frontend.__main__ import add_arguments as frontend_arguments
from despina.services.supervisor import Child, Supervisor

SHIPPED = Path(__file__).resolve().parents[2] / "model_repository"


def planned_children(monkeypatch, *flags: str) -> list[Child]:
    """The children ``despina serve`` would start with ``flags``; nothing is started."""
    planned: list[Child] = []

    def plan_only(self: Supervisor) -> int:
        try:
            self.plan()
            planned.extend(self.children)
        finally:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return 0

    monkeypatch.setattr(Supervisor, "run", plan_only)
    assert cli.serve([f"--model-repository={SHIPPED}", "--frontends=2", *flags]) == 0
    return planned


def parsed(child: Child) -> argparse.Namespace:
    """A child's command line, parsed by that service's own flags."""
    module = child.argv[2]
    add = {
        "despina.services.frontend": frontend_arguments,
        "despina.services.backend_host": backend_arguments,
    }[module]
    parser = argparse.ArgumentParser(exit_on_error=False, allow_abbrev=False)
    add(parser)
    return parser.parse_args(child.argv[3:])


def services(children: list[Child]) -> tuple[list[Child], list[Child]]:
    frontends = [c for c in children if c.name.startswith("frontend-")]
    hosts = [c for c in children if c.name.startswith("backend-")]
    return frontends, hosts


def test_serve_passes_the_threshold_to_frontends_and_backend_hosts(monkeypatch):
    frontends, hosts = services(planned_children(monkeypatch, "--inline-threshold", "1024"))
    assert len(frontends) == 2
    assert {c.name for c in hosts} == {"backend-onnxruntime", "backend-python"}
    for child in frontends + hosts:
        assert "--inline-threshold=1024" in child.argv, child.name
        assert parsed(child).inline_threshold == 1024, child.name


def test_serve_passes_the_default_explicitly(monkeypatch):
    frontends, hosts = services(planned_children(monkeypatch))
    for child in frontends + hosts:
        assert f"--inline-threshold={INLINE_THRESHOLD}" in child.argv, child.name


def test_every_service_defaults_to_one_threshold():
    parser = argparse.ArgumentParser()
    backend_arguments(parser)
    assert parser.parse_args(["--framework", "python"]).inline_threshold == INLINE_THRESHOLD
    parser = argparse.ArgumentParser()
    frontend_arguments(parser)
    assert parser.parse_args([]).inline_threshold == INLINE_THRESHOLD


def test_a_negative_threshold_is_refused(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        planned_children(monkeypatch, "--inline-threshold=-1")
    assert "expected a number of bytes >= 0" in capsys.readouterr().err


def test_serve_passes_the_busy_poll_budget_to_frontends_and_backend_hosts(monkeypatch):
    frontends, hosts = services(planned_children(monkeypatch, "--busy-poll-us", "250"))
    for child in frontends + hosts:
        assert "--busy-poll-us=250" in child.argv, child.name
        assert parsed(child).busy_poll_us == 250, child.name
    frontends, hosts = services(planned_children(monkeypatch))
    for child in frontends + hosts:
        assert parsed(child).busy_poll_us == BUSY_POLL_US, child.name


@pytest.mark.parametrize(
    ("value", "message"),
    [("-1", "expected a number of µs >= 0"), ("soon", "invalid microseconds value")],
)
def test_a_bad_busy_poll_budget_is_refused(monkeypatch, capsys, value, message):
    with pytest.raises(SystemExit):
        planned_children(monkeypatch, f"--busy-poll-us={value}")
    assert message in capsys.readouterr().err
