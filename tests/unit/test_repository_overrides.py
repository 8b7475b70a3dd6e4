"""The repository's pure parts that model control stands on (services/scheduler/
repository.py): override files never leave their folder, fingerprints see a change, a
JSON config override is read and checked like a config.pbtxt."""

from __future__ import annotations

import base64
import json
import os
import shutil

import pytest

from despina.common.errors import ServerError
from despina.services.scheduler.repository import (
    fingerprint,
    list_models,
    read_model,
    write_override_files,
)

from conftest import SHIPPED_REPOSITORY

B64 = base64.b64encode(b"content").decode()


@pytest.mark.parametrize(
    "name",
    [
        "../escape",
        "1/../../escape",
        "/etc/passwd",
        "1//model.onnx",
        "./1/model.onnx",
        "1/./model.onnx",
        "1\\..\\x",
        "1/model\0.onnx",
        "",
        "..",
    ],
)
def test_override_files_outside_their_folder_are_refused(tmp_path, name):
    parent = tmp_path / "owned"
    with pytest.raises(ServerError, match="relative path inside the model folder"):
        write_override_files("m", {"1/ok.bin": B64, name: B64}, parent)
    assert not parent.exists() or not any(parent.iterdir())  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["owned"])


def test_override_files_land_in_a_new_folder_of_the_server(tmp_path):
    parent = tmp_path / "owned"
    folder = write_override_files(
        "m", {"1/model.onnx": B64, "labels.txt": base64.b64encode(b"a\nb").decode()}, parent
    )
    assert folder.name == "m" and folder.parent.parent == parent
    assert (folder / "1" / "model.onnx").read_bytes() == b"content"
    assert (folder / "labels.txt").read_bytes() == b"a\nb"
    again = write_override_files("m", {"1/model.onnx": B64}, parent)
    assert again != folder  # each load its own folder


def test_override_content_must_be_base64(tmp_path):
    with pytest.raises(ServerError, match="not valid base64"):
        write_override_files("m", {"1/model.onnx": "not base64!"}, tmp_path)


def test_fingerprint_sees_files_added_changed_and_removed(tmp_path):
    model = tmp_path / "m"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text("a")
    first = fingerprint(model)
    assert first == fingerprint(model)
    (model / "2").mkdir()
    (model / "2" / "model.onnx").write_bytes(b"x")
    second = fingerprint(model)
    assert second != first
    (model / "config.pbtxt").write_text("ab")
    third = fingerprint(model)
    assert third not in (first, second)
    os.remove(model / "2" / "model.onnx")
    assert fingerprint(model) != third
    assert fingerprint(tmp_path / "gone") == ""


def test_config_override_replaces_config_pbtxt(tmp_path):
    shutil.copytree(SHIPPED_REPOSITORY / "identity_fp32", tmp_path / "identity_fp32")
    path = list_models([tmp_path])["identity_fp32"]
    config = {
        "max_batch_size": 4,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
        "version_policy": {"all": {}},
    }
    model = read_model(path, json.dumps(config))
    assert model.error == "" and model.config is not None
    assert model.config.max_batch_size == 4 and model.config.name == "identity_fp32"
    assert model.config.platform == "onnxruntime_onnx"  # completed from the model file
    assert list(model.versions) == ["1"]
    # Read under another name (a load's name for a folder of file overrides).
    assert read_model(path, json.dumps(config), "other").config.name == "other"


@pytest.mark.parametrize(
    "config, says",
    [
        ("{not json", "the 'config' parameter"),
        (json.dumps({"max_batch_size": -1}), "max_batch_size"),
        (json.dumps({"name": "elsewhere"}), "names model 'elsewhere'"),
        (json.dumps({"no_such_field": 1}), "the 'config' parameter"),
    ],
)
def test_a_config_override_that_cannot_be_used_says_why(tmp_path, config, says):
    shutil.copytree(SHIPPED_REPOSITORY / "identity_fp32", tmp_path / "identity_fp32")
    model = read_model(tmp_path / "identity_fp32", config)
    assert model.config is None and says in model.error, model.error


def test_a_model_in_two_repositories_is_refused(tmp_path):
    for repo in ("a", "b"):
        (tmp_path / repo / "m").mkdir(parents=True)
    with pytest.raises(ServerError, match="more than one model repository"):
        list_models([tmp_path / "a", tmp_path / "b"])
