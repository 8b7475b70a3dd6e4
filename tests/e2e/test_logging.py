"""The logging extension end to end (Triton's ``/v2/logging`` and gRPC ``LogSettings``):
the settings start from the flags (``--log-format``), read and change with tritonclient
over HTTP and gRPC, sync and aio, and a change reaches every process at run time: verbose
lines appear in the frontend's, the scheduler's, the ONNX Runtime host's and the Python
model instance's lines after the change, and none before. Each line names its process
(role and pid) and, for a request, its id."""

from __future__ import annotations

import asyncio
import re
import shutil
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, DespinaServer

ISO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ([IWEV]) (\d+) (\S+) (\S+)\] ")
DEFAULT_LINE = re.compile(r"^([IWEV])\d{4} \d\d:\d\d:\d\d\.\d{6} (\d+) (\S+) (\S+)\] ")
ROLES = ("frontend", "scheduler", "backend-onnxruntime", "backend-python")
REQUEST_ROLES = ("frontend", "backend-onnxruntime", "backend-python")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    for model in ("simple", "add_sub"):
        shutil.copytree(SHIPPED_REPOSITORY / model, root / model)
    srv = DespinaServer(
        root, tmp_path_factory.mktemp("logs") / "serve.log", ["--log-format=ISO8601"]
    ).start()
    yield srv
    srv.stop()


def _lines(server: DespinaServer) -> list[str]:
    return server.log_path.read_text(errors="replace").splitlines()


def _infer(server: DespinaServer, request_id: str) -> None:
    """One request to each model, checked value by value."""
    client = httpclient.InferenceServerClient(server.url)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(a)
    result = client.infer("simple", inputs, request_id=request_id)
    assert result.as_numpy("OUTPUT0").tolist() == (a * 2).tolist()
    f = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 16)
    inputs = [httpclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(f)
    inputs[1].set_data_from_numpy(f)
    result = client.infer("add_sub", inputs, request_id=request_id)
    assert result.as_numpy("OUTPUT0").tolist() == (f + f).tolist()


def _verbose_roles(lines: list[str], marker: str) -> set[str]:
    """The roles of the verbose lines that name ``marker`` (a request id) or a query."""
    roles = set()
    for line in lines:
        found = ISO_LINE.match(line)
        if found and found.group(1) == "V" and marker in line:
            roles.add(found.group(3))
    return roles


def test_flags_set_the_start_and_http_reads_them(server):
    client = httpclient.InferenceServerClient(server.url)
    assert client.get_log_settings() == {
        "log_file": "",
        "log_info": True,
        "log_warning": True,
        "log_error": True,
        "log_verbose_level": 0,
        "log_format": "ISO8601",
    }
    started = [ISO_LINE.match(line) for line in _lines(server)]
    roles = {m.group(3) for m in started if m}
    assert set(ROLES) <= roles  # every service wrote ISO8601 lines from its start


def test_verbose_reaches_every_process_at_run_time(server):
    client = httpclient.InferenceServerClient(server.url)
    _infer(server, "before-change")
    assert _verbose_roles(_lines(server), "before-change") == set()
    assert not [m for m in map(ISO_LINE.match, _lines(server)) if m and m.group(1) == "V"]

    settings = client.update_log_settings({"log_verbose_level": 1})
    assert settings["log_verbose_level"] == 1
    try:
        _infer(server, "after-change")
        client.get_model_metadata("simple")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines = _lines(server)
            roles = _verbose_roles(lines, "after-change")
            queried = _verbose_roles(lines, "query model_metadata 'simple'")
            if set(REQUEST_ROLES) <= roles and {"frontend", "scheduler"} <= queried:
                break
            time.sleep(0.1)
        # The frontend and both hosts name the request (the Python model's instance
        # process is a backend host of its own); the scheduler, off the direct route,
        # logs the query.
        assert set(REQUEST_ROLES) <= roles, roles
        assert {"frontend", "scheduler"} <= queried
        pids = {
            ISO_LINE.match(line).group(2)
            for line in lines
            if ISO_LINE.match(line) and "after-change" in line and " backend-python " in line
        }
        assert pids  # the instance process, with its own pid
    finally:
        client.update_log_settings({"log_verbose_level": 0})
    _infer(server, "after-reset")
    time.sleep(0.5)
    assert _verbose_roles(_lines(server), "after-reset") == set()


def test_format_and_severities_change_everywhere(server):
    client = httpclient.InferenceServerClient(server.url)
    settings = client.update_log_settings({"log_format": "default", "log_info": False})
    assert settings["log_format"] == "default" and settings["log_info"] is False
    try:
        client.update_log_settings({"log_info": True})
        # The scheduler logs the change at INFO, in the new format, once info is back on.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            tail = [DEFAULT_LINE.match(line) for line in _lines(server)[-20:]]
            if any(m and m.group(3) == "scheduler" and m.group(1) == "I" for m in tail):
                break
            time.sleep(0.1)
        assert any(m and m.group(3) == "scheduler" for m in tail)
    finally:
        client.update_log_settings({"log_format": "ISO8601", "log_info": True})


def test_refusals_as_triton(server):
    client = httpclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException) as err:
        client.update_log_settings({"log_file": "/tmp/elsewhere.log"})
    assert "log file location can not be updated through network protocol" in str(err.value)
    for bad in ({"log_verbose_level": -1}, {"log_info": "yes"}, {"log_format": "json"}):
        with pytest.raises(InferenceServerException) as err:
            client.update_log_settings(bad)
        assert next(iter(bad)) in str(err.value)
    assert client.get_log_settings()["log_verbose_level"] == 0


def test_grpc_sync_and_aio(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    got = client.get_log_settings(as_json=True)["settings"]
    assert got["log_format"] == {"string_param": "ISO8601"}
    assert got["log_info"] == {"bool_param": True}
    changed = client.update_log_settings({"log_verbose_level": 2}, as_json=True)["settings"]
    assert changed["log_verbose_level"] == {"uint32_param": 2}
    with pytest.raises(InferenceServerException) as err:
        client.update_log_settings({"log_file": "x.log"})
    assert "can not be updated through network protocol" in str(err.value)

    async def aio() -> tuple[dict, dict]:
        async with grpcaio.InferenceServerClient(server.grpc_url) as grpc_aio:
            back = await grpc_aio.update_log_settings({"log_verbose_level": 0}, as_json=True)
        http_aio = httpaio.InferenceServerClient(server.url)
        try:
            now = await http_aio.get_log_settings()
        finally:
            await http_aio.close()
        return back, now

    back, now = asyncio.run(aio())
    assert back["settings"]["log_verbose_level"] == {"uint32_param": 0}
    assert now["log_verbose_level"] == 0 and now["log_format"] == "ISO8601"


def test_logging_is_a_listed_extension(server):
    metadata = httpclient.InferenceServerClient(server.url).get_server_metadata()
    assert "logging" in metadata["extensions"]
    assert "trace" in metadata["extensions"]
