"""common/settings.py: the speed paths' switches as ``despina serve`` and each service
parse them, ``DESPINA_SPEED_PATHS``, and the process settings read from the environment."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from despina.common import streams
from despina.common.settings import (
    BUSY_POLL_US,
    FrontendSettings,
    HostSettings,
    ProcessSettings,
    SchedulerSettings,
    SpeedPaths,
)
from despina.common.shm import arena
from despina.services import cli
from despina.services.backend_host.__main__ import add_arguments as host_arguments
from despina.services.frontend.__main__ import add_arguments as frontend_arguments
from despina.services.scheduler.__main__ import add_arguments as scheduler_arguments
from despina.services.supervisor import Supervisor

SHIPPED = Path(__file__).resolve().parents[2] / "model_repository"
ALL_OFF = SpeedPaths(memo=False, burst=False, busy_poll_us=0, loop_execution=False,
                     direct_routes=False)  # fmt: skip


def speed_of(*flags: str, environ: dict | None = None) -> SpeedPaths:
    """The speed paths ``despina frontend`` would take with ``flags``."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    frontend_arguments(parser)
    return SpeedPaths.from_args(parser.parse_args(list(flags)), environ or {})


def test_every_path_is_on_by_default():
    assert speed_of() == SpeedPaths() == SpeedPaths(True, True, BUSY_POLL_US, True, True)


@pytest.mark.parametrize(
    ("flags", "environ"),
    [(["--speed-paths=off"], {}), ([], {"DESPINA_SPEED_PATHS": "off"})],
    ids=["flag", "environment"],
)
def test_one_switch_turns_every_path_off(flags, environ):
    assert speed_of(*flags, environ=environ) == ALL_OFF == SpeedPaths.off()


def test_the_flag_beats_the_environment_and_a_path_flag_beats_both():
    assert speed_of("--speed-paths=on", environ={"DESPINA_SPEED_PATHS": "off"}) == SpeedPaths()
    assert speed_of("--speed-paths=off", "--direct-routes=true", "--busy-poll-us=50") == (
        SpeedPaths(False, False, 50, False, True)
    )


@pytest.mark.parametrize(
    ("flag", "field", "off"),
    [
        ("--request-memo=false", "memo", False),
        ("--burst-sends=false", "burst", False),
        ("--busy-poll-us=0", "busy_poll_us", 0),
        ("--loop-execution=false", "loop_execution", False),
        ("--direct-routes=false", "direct_routes", False),
    ],
)
def test_each_path_has_its_own_switch(flag, field, off):
    speed = speed_of(flag)
    assert getattr(speed, field) == off
    others = {name: getattr(speed, name) for name in SpeedPaths.__slots__ if name != field}
    assert others == {name: getattr(SpeedPaths(), name) for name in others}


def test_a_malformed_environment_switch_is_refused():
    with pytest.raises(ValueError, match="DESPINA_SPEED_PATHS must be on or off"):
        speed_of(environ={"DESPINA_SPEED_PATHS": "sometimes"})


@pytest.mark.parametrize("speed", [SpeedPaths(), ALL_OFF, SpeedPaths(True, False, 7, False, True)])
@pytest.mark.parametrize("add", [frontend_arguments, host_arguments, scheduler_arguments])
def test_each_service_parses_the_paths_as_they_were_forwarded(speed, add):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add(parser)
    required = ["--model-repository=x"] if add is scheduler_arguments else []
    required += ["--framework=python"] if add is host_arguments else []
    args = parser.parse_args([*required, *speed.argv()])
    # The service's environment cannot undo what serve decided.
    assert SpeedPaths.from_args(args, {"DESPINA_SPEED_PATHS": "on"}) == speed
    assert SpeedPaths.from_args(args, {"DESPINA_SPEED_PATHS": "off"}) == speed


def planned(monkeypatch, *flags: str) -> list:
    children: list = []

    def plan_only(self: Supervisor) -> int:
        try:
            self.plan()
            children.extend(self.children)
        finally:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return 0

    monkeypatch.setattr(Supervisor, "run", plan_only)
    assert cli.serve([f"--model-repository={SHIPPED}", *flags]) == 0
    return children


def test_serve_forwards_speed_paths_off_to_every_service(monkeypatch):
    monkeypatch.delenv("DESPINA_SPEED_PATHS", raising=False)
    children = planned(monkeypatch, "--speed-paths=off")
    assert {c.name for c in children} >= {"scheduler", "frontend-0", "backend-python"}
    for child in children:
        for flag in ALL_OFF.argv():
            assert flag in child.argv, child.name
    monkeypatch.setenv("DESPINA_SPEED_PATHS", "off")
    for child in planned(monkeypatch, "--loop-execution=true"):
        assert "--loop-execution=true" in child.argv and "--burst-sends=false" in child.argv


def test_serve_refuses_a_malformed_environment_switch(monkeypatch, capsys):
    monkeypatch.setenv("DESPINA_SPEED_PATHS", "maybe")
    assert cli.serve([f"--model-repository={SHIPPED}"]) == 2
    assert "DESPINA_SPEED_PATHS must be on or off" in capsys.readouterr().err


def test_process_settings_read_the_environment_once_and_set_the_module_values(monkeypatch):
    default = ProcessSettings.from_environ({})
    assert (default.shm_dir, default.max_message_bytes) == ("/dev/shm", 1 << 31)
    settings = ProcessSettings.from_environ(
        {"DESPINA_SHM_DIR": "/tmp/shm-elsewhere", "DESPINA_MAX_MESSAGE_BYTES": "4096"}
    )
    monkeypatch.setattr(arena, "SHM_DIR", arena.SHM_DIR)
    monkeypatch.setattr(streams, "MAX_MESSAGE_BYTES", streams.MAX_MESSAGE_BYTES)
    monkeypatch.setattr(streams, "MAX_FRAME_BYTES", streams.MAX_FRAME_BYTES)
    settings.apply()
    assert arena.SHM_DIR == "/tmp/shm-elsewhere"
    assert streams.MAX_MESSAGE_BYTES == streams.MAX_FRAME_BYTES == 4096
    for bad in ("lots", "0"):
        with pytest.raises(ValueError, match="DESPINA_MAX_MESSAGE_BYTES"):
            ProcessSettings.from_environ({"DESPINA_MAX_MESSAGE_BYTES": bad})


def test_service_settings_take_their_transports_from_the_environment():
    args = argparse.Namespace()
    frontend = FrontendSettings.from_args(
        args, {"DESPINA_HTTP_TRANSPORT": "aiohttp", "DESPINA_GRPC_TRANSPORT": "grpcio"}
    )
    assert (frontend.http_transport, frontend.grpc_transport) == ("aiohttp", "grpcio")
    assert FrontendSettings.from_args(args, {}).grpc_transport == "auto"
    with pytest.raises(ValueError, match="DESPINA_HTTP_TRANSPORT must be 'lean' or 'aiohttp'"):
        FrontendSettings.from_args(args, {"DESPINA_HTTP_TRANSPORT": "nginx"})
    off = {"DESPINA_SPEED_PATHS": "off"}
    assert HostSettings.from_args(args, off).speed == ALL_OFF
    assert SchedulerSettings.from_args(args, off).speed == ALL_OFF


def test_an_outbox_without_bursts_sends_each_item_at_once_alone():
    import asyncio

    from despina.common.outbox import Outbox

    async def scenario() -> tuple[list, list]:
        sent: list = []
        plain = Outbox(sent.append, burst=False)
        plain.put("peer", 1)
        plain.put("peer", 2)
        with plain.gathering:
            plain.put("other", 3)
            inside = list(sent)
        at_once = list(sent)
        bursts: list = []
        burst = Outbox(bursts.append)
        burst.put("peer", 1)
        burst.put("peer", 2)
        before = list(bursts)
        await asyncio.sleep(0)
        return [inside, at_once], [before, bursts]

    plain, burst = asyncio.run(scenario())
    assert plain == [
        [{"peer": [1]}, {"peer": [2]}, {"other": [3]}],
        [{"peer": [1]}, {"peer": [2]}, {"other": [3]}],
    ]
    assert burst == [[], [{"peer": [1, 2]}]]
