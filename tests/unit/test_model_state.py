"""The explicit-mode state file (services/scheduler/model_state.py): written whole and
atomically at each load and unload, read back by a scheduler started again."""

from __future__ import annotations

import orjson

from despina.services.scheduler.model_state import FILE_NAME, ModelState


def test_no_file_is_a_first_start(tmp_path):
    assert ModelState(tmp_path / "state").read() is None


def test_loads_and_unloads_are_read_back(tmp_path):
    state = ModelState(tmp_path / "state")  # the folder is made at the first write
    state.models = {"simple": {}}
    state.loaded("late", {"config": '{"max_batch_size": 4}', "file:1/model.onnx": "AAEC"})
    state.loaded("other", {})
    state.unloaded("simple")
    assert ModelState(tmp_path / "state").read() == {
        "late": {"config": '{"max_batch_size": 4}', "file:1/model.onnx": "AAEC"},
        "other": {},
    }
    # nothing but the file is left in the folder (the temporary one was renamed)
    assert [p.name for p in (tmp_path / "state").iterdir()] == [FILE_NAME]


def test_a_file_that_is_not_state_is_ignored(tmp_path):
    (tmp_path / FILE_NAME).write_bytes(b"{not json")
    assert ModelState(tmp_path).read() is None
    (tmp_path / FILE_NAME).write_bytes(orjson.dumps({"models": {"a": "not a dict"}}))
    assert ModelState(tmp_path).read() is None
    (tmp_path / FILE_NAME).write_bytes(orjson.dumps({"models": {}}))
    assert ModelState(tmp_path).read() == {}  # everything unloaded: load nothing


def test_a_write_that_fails_keeps_serving(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    state = ModelState(blocker / "state")  # under a file: cannot be made
    state.loaded("simple", {})  # logged, not raised
    assert state.models == {"simple": {}}
