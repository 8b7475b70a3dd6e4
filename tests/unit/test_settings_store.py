"""The logging and trace settings' rules, table-tested: tritonserver's flags read into
settings (services/observability_flags.py), and the scheduler's store
(services/scheduler/settings_store.py): checks, per-model fallback, clearing, and what
a change sends to every process."""

from __future__ import annotations

import argparse

import orjson
import pytest

from despina.common import control as c
from despina.common import logs
from despina.common import messages as m
from despina.services.observability_flags import (
    add_log_trace_flags,
    log_trace_argv,
    otel_settings_of,
    refuse,
    trace_settings_of,
)
from despina.services.scheduler.settings_store import SettingsStore


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log-verbose", type=int, default=0)
    add_log_trace_flags(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ((), {}),
        (
            (
                "--trace-config=triton,file=/tmp/t.json",
                "--trace-config=rate=1",
                "--trace-config=level=TIMESTAMPS",
                "--trace-config=level=TENSORS",
                "--trace-config=count=5",
                "--trace-config=triton,log-frequency=50",
                "--trace-config=mode=triton",
            ),
            {
                "trace_file": ["/tmp/t.json"],
                "trace_rate": ["1"],
                "trace_level": ["TIMESTAMPS", "TENSORS"],
                "trace_count": ["5"],
                "log_frequency": ["50"],
                "trace_mode": ["triton"],
            },
        ),
        (
            ("--trace-file=/tmp/a.json", "--trace-level=TIMESTAMPS", "--trace-rate=7"),
            {"trace_file": ["/tmp/a.json"], "trace_level": ["TIMESTAMPS"], "trace_rate": ["7"]},
        ),
        (  # --trace-config wins over the older spelling
            ("--trace-rate=7", "--trace-config=rate=3"),
            {"trace_rate": ["3"]},
        ),
    ],
)
def test_trace_flags(argv, expected):
    args = parse(*argv)
    assert trace_settings_of(args) == expected
    # what serve forwards reads back the same in a service
    assert trace_settings_of(parse(*log_trace_argv(args))) == expected


@pytest.mark.parametrize(
    "flag",
    [
        "--trace-config=mode=zipkin",
        "--trace-config=opentelemetry,colour=blue",
        "--trace-config=rate",
        "--trace-config=colour=blue",
    ],
)
def test_trace_flags_refused(flag):
    problems = refuse(parse(flag))
    assert len(problems) == 1 and flag.partition("=")[2] in problems[0]


def test_opentelemetry_flags():
    """mode=opentelemetry (its packages are installed here) and its own settings, which
    the frontend reads (otel_settings_of), forwarded by serve unchanged."""
    args = parse(
        "--trace-config=mode=opentelemetry",
        "--trace-config=opentelemetry,url=http://127.0.0.1:4318/v1/traces",
        "--trace-config=opentelemetry,resource=service.name=a",
        "--trace-config=opentelemetry,resource=service.version=2",
        "--trace-config=opentelemetry,bsp_schedule_delay=100",
    )
    assert refuse(args) == []
    assert trace_settings_of(args) == {"trace_mode": ["opentelemetry"]}
    expected = {
        "url": ["http://127.0.0.1:4318/v1/traces"],
        "resource": ["service.name=a", "service.version=2"],
        "bsp_schedule_delay": ["100"],
    }
    assert otel_settings_of(args) == expected
    assert otel_settings_of(parse(*log_trace_argv(args))) == expected


def test_log_flags_forwarded():
    args = parse("--log-info=false", "--log-format=ISO8601", "--log-file=/tmp/x.log")
    again = parse(*log_trace_argv(args))
    assert (again.log_info, again.log_warning, again.log_format, again.log_file) == (
        False,
        True,
        "ISO8601",
        "/tmp/x.log",
    )


def ask(store: SettingsStore, kind: str, model: str = "", body: object = None):
    raw = b"" if body is None else orjson.dumps(body)
    reply, changed = store.answer(m.Query(1, kind, model, "", raw))  # type: ignore[arg-type]
    return reply, changed


def test_trace_model_fallback_and_clearing():
    store = SettingsStore(trace_settings={"trace_rate": ["10"], "trace_file": ["/tmp/t"]})
    reply, changed = ask(
        store, "trace_setting", "m", {"trace_rate": "2", "trace_level": ["TIMESTAMPS"]}
    )
    assert changed and isinstance(reply.record, c.TraceSettings)
    assert reply.record.settings["trace_rate"] == ["2"]
    assert reply.record.settings["trace_file"] == ["/tmp/t"]  # the global one
    assert store.message().trace["m"] == {"trace_rate": ["2"], "trace_level": ["TIMESTAMPS"]}
    # the global rate changes; the model keeps its own
    ask(store, "trace_setting", "", {"trace_rate": "5"})
    assert store.effective("m")["trace_rate"] == ["2"]
    assert store.effective("other")["trace_rate"] == ["5"]
    # cleared: the model follows the global rate again; cleared globally: the start value
    ask(store, "trace_setting", "m", {"trace_rate": None})
    assert store.effective("m")["trace_rate"] == ["5"]
    ask(store, "trace_setting", "", {"trace_rate": None})
    assert store.effective("m")["trace_rate"] == ["10"]
    ask(store, "trace_setting", "m", {"trace_level": None})
    assert "m" not in store.trace  # nothing of its own left
    _, changed = ask(store, "trace_setting", "m")  # a read changes nothing
    assert not changed


@pytest.mark.parametrize(
    ("kind", "body", "code", "words"),
    [
        ("trace_setting", {"trace_file": "/x"}, "UNSUPPORTED", "trace file location"),
        ("trace_setting", {"trace_rate": "0"}, "INVALID_ARG", "trace_rate"),
        ("trace_setting", {"trace_count": "-2"}, "INVALID_ARG", "trace_count"),
        ("trace_setting", {"trace_level": []}, "INVALID_ARG", "trace_level"),
        ("trace_setting", {"trace_level": [1]}, "INVALID_ARG", "trace_level"),
        ("trace_setting", {"nope": "1"}, "INVALID_ARG", "nope"),
        ("trace_setting", [], "INVALID_ARG", "JSON object"),
        ("log_settings", {"log_file": "/x"}, "UNSUPPORTED", "log file location"),
        ("log_settings", {"log_verbose_level": True}, "INVALID_ARG", "log_verbose_level"),
        ("log_settings", {"log_error": 1}, "INVALID_ARG", "log_error"),
        ("log_settings", {"log_format": "json"}, "INVALID_ARG", "log_format"),
    ],
)
def test_refusals(kind, body, code, words):
    store = SettingsStore()
    before = store.message()
    reply, changed = ask(store, kind, "", body)
    assert reply.error is not None and reply.error.code == code and words in reply.error.message
    assert not changed and store.message() == before


def test_a_refused_update_changes_nothing_of_it():
    store = SettingsStore()
    ask(store, "log_settings", "", {"log_info": False, "log_format": "json"})
    assert store.log["log_info"] is True


def test_changes_are_kept_in_the_state_folder_and_taken_up_again(tmp_path):
    """A scheduler started again with the same flags and state folder has the settings
    clients changed, not the flags' (what it tells every process); the files and the
    mode, fixed at start, are not kept."""
    flags = {"trace_file": ["/tmp/t.json"], "trace_rate": ["10"]}
    store = SettingsStore({"log_verbose_level": 0}, flags, str(tmp_path))
    ask(store, "log_settings", "", {"log_info": True})  # a read-alike: nothing changed
    assert not (tmp_path / "settings.json").exists()
    try:
        ask(store, "log_settings", "", {"log_verbose_level": 2, "log_warning": False})
        ask(store, "trace_setting", "m", {"trace_rate": "3", "trace_level": ["TIMESTAMPS"]})
        ask(store, "trace_setting", "", {"trace_count": "7"})
        kept = orjson.loads((tmp_path / "settings.json").read_bytes())
        assert "log_file" not in kept["log"]
        assert "trace_file" not in kept["trace"][""] and "trace_mode" not in kept["trace"][""]
        again = SettingsStore({"log_verbose_level": 0}, flags, str(tmp_path))
        assert again.message() == store.message()
        assert again.log["log_verbose_level"] == 2 and again.log["log_warning"] is False
        assert again.effective("m")["trace_rate"] == ["3"]
        assert again.effective("other")["trace_count"] == ["7"]
        assert again.effective("other")["trace_file"] == ["/tmp/t.json"]  # the flag's
        # A clear is kept as well: the model follows the global settings again.
        ask(again, "trace_setting", "m", {"trace_rate": None, "trace_level": None})
        third = SettingsStore({"log_verbose_level": 0}, flags, str(tmp_path))
        assert "m" not in third.trace and third.effective("m")["trace_rate"] == ["10"]
    finally:
        logs.apply({"log_verbose_level": 0, "log_warning": True})


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        orjson.dumps({"log": {"log_verbose_level": -1}}),
        orjson.dumps({"log": {"log_file": "/tmp/elsewhere.log"}}),
        orjson.dumps({"trace": {"m": {"trace_file": "/tmp/x.json"}}}),
        # One good change and one refused: none of them is taken.
        orjson.dumps({"log": {"log_verbose_level": 1}, "trace": {"": {"trace_rate": "0"}}}),
    ],
    ids=["not-json", "not-an-object", "bad-level", "log-file", "trace-file", "half-good"],
)
def test_kept_settings_that_are_refused_leave_the_flags(tmp_path, content):
    (tmp_path / "settings.json").write_bytes(content)
    store = SettingsStore({"log_verbose_level": 0}, {"trace_rate": ["10"]}, str(tmp_path))
    assert (
        store.message() == SettingsStore({"log_verbose_level": 0}, {"trace_rate": ["10"]}).message()
    )
