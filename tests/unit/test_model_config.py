"""common/model_config.py: parsing, loading from a model folder, defaults, validation,
version policies, and the JSON renderings of config and metadata."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from despina.common import model_config
from despina.common.errors import Code, ServerError

ADD = """
input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [16] }]
output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [16] }]
"""


def write_model(
    root: Path,
    name: str,
    config: str | None,
    versions: tuple[str, ...] = ("1",),
    files: tuple[str, ...] = (),
) -> Path:
    """A model folder: ``config.pbtxt`` (unless None), empty version folders, and
    ``files`` (paths relative to the model folder, created empty)."""
    model_dir = root / name
    model_dir.mkdir()
    if config is not None:
        (model_dir / "config.pbtxt").write_text(config)
    for v in versions:
        (model_dir / v).mkdir()
    for f in files:
        (model_dir / f).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / f).write_bytes(b"")
    return model_dir


def raises_invalid_arg(fn, *args, fragments: tuple[str, ...] = ()) -> ServerError:
    with pytest.raises(ServerError) as exc_info:
        fn(*args)
    assert exc_info.value.code is Code.INVALID_ARG, exc_info.value
    for fragment in fragments:
        assert fragment in exc_info.value.message, exc_info.value.message
    return exc_info.value


# --- parse_text -------------------------------------------------------------------------


def test_parse_text_reads_the_proto() -> None:
    config = model_config.parse_text('name: "m" max_batch_size: 4' + ADD)
    assert config.name == "m"
    assert config.max_batch_size == 4
    assert [i.name for i in config.input] == ["INPUT0"]
    assert list(config.input[0].dims) == [16]
    assert config.input[0].data_type == mc.TYPE_FP32


@pytest.mark.parametrize(
    "text",
    [
        "name: ",
        'name: "m" max_batch_size: "eight"',
        "no_such_field: 1",
        'input [{ name: "x" data_type: TYPE_NOPE }]',
        'input [{ name: "x" ',
        "max_batch_size: 99999999999999999999",
    ],
    ids=["no-value", "wrong-type", "unknown-field", "unknown-enum", "unclosed", "overflow"],
)
def test_parse_text_errors_name_the_file(text: str) -> None:
    err = raises_invalid_arg(
        model_config.parse_text, text, "models/m/config.pbtxt", fragments=("failed to parse",)
    )
    assert "models/m/config.pbtxt" in err.message


def test_parse_text_default_source_is_config_pbtxt() -> None:
    raises_invalid_arg(model_config.parse_text, "bogus: 1", fragments=("config.pbtxt",))


# --- load: the model folder ------------------------------------------------------------


def test_load_missing_config_is_minimal_with_auto_complete(tmp_path: Path) -> None:
    """Without config.pbtxt the folder's model file names the framework; the backend host
    completes inputs and outputs at load (needs_completion)."""
    model_dir = write_model(tmp_path, "noconf", None, files=("1/model.onnx",))
    config = model_config.load(model_dir, auto_complete=True)
    assert (config.name, config.platform, config.backend) == (
        "noconf",
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config.default_model_filename == "model.onnx"
    assert model_config.needs_completion(config)


def test_load_missing_config_is_invalid_arg_when_strict(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "noconf", None, files=("1/model.onnx",))
    with pytest.raises(ServerError) as exc_info:
        model_config.load(model_dir, auto_complete=False)
    assert exc_info.value.code is Code.INVALID_ARG
    assert "model 'noconf' has no config.pbtxt" in exc_info.value.message
    assert "--strict-model-config=true" in exc_info.value.message


@pytest.mark.parametrize(
    ("text", "missing"),
    [('backend: "onnxruntime"', "input"), ('backend: "python"' + ADD.split("output")[0], "output")],
)
def test_load_incomplete_config_is_invalid_arg_when_strict(
    tmp_path: Path, text: str, missing: str
) -> None:
    model_dir = write_model(tmp_path, "partial", text)
    with pytest.raises(ServerError) as exc_info:
        model_config.load(model_dir, auto_complete=False)
    assert f"declares no {missing}, and auto-complete is disabled" in exc_info.value.message
    # With auto-complete (the default) it is left for the backend.
    assert model_config.needs_completion(model_config.load(model_dir))


def test_set_auto_complete_is_loads_default(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "noconf", None, files=("1/model.onnx",))
    model_config.set_auto_complete(False)
    try:
        raises_invalid_arg(model_config.load, model_dir, fragments=("has no config.pbtxt",))
    finally:
        model_config.set_auto_complete(True)
    assert model_config.load(model_dir).name == "noconf"


# --- complete_from_model: Triton's ONNX auto-complete rules --------------------------------


def _completed(text: str, inputs: list, outputs: list) -> mc.ModelConfig:
    config = model_config.parse_text(text)
    model_config.complete_from_model(config, inputs, outputs)
    return config


def _io(items) -> list[tuple[str, int, list[int]]]:
    return [(t.name, t.data_type, list(t.dims)) for t in items]


def test_complete_dynamic_first_dimension_is_the_batch() -> None:
    config = _completed(
        "", [("A", "FP32", [-1, 4]), ("S", "BYTES", [-1])], [("O", "INT64", [-1, 2, -1])]
    )
    assert config.max_batch_size == model_config.DEFAULT_MAX_BATCH_SIZE == 4
    assert _io(config.input) == [("A", mc.TYPE_FP32, [4]), ("S", mc.TYPE_STRING, [1])]
    assert _io(config.output) == [("O", mc.TYPE_INT64, [2, -1])]
    # Despina leaves scheduling to the config as read (Triton would add dynamic_batching).
    assert config.WhichOneof("scheduling_choice") is None


def test_complete_fixed_first_dimension_is_no_batch() -> None:
    config = _completed("", [("A", "INT32", [2, 3])], [("O", "INT32", [-1, 3])])
    assert config.max_batch_size == 0
    assert _io(config.input) == [("A", mc.TYPE_INT32, [2, 3])]
    assert _io(config.output) == [("O", mc.TYPE_INT32, [-1, 3])]


def test_complete_keeps_declared_tensors_and_max_batch_size() -> None:
    config = _completed(
        'max_batch_size: 2 input [{ name: "A" data_type: TYPE_FP16 dims: [8] }]',
        [("A", "FP32", [-1, 4]), ("B", "FP32", [-1, 4])],
        [("O", "FP32", [-1, 4])],
    )
    assert config.max_batch_size == 2
    assert _io(config.input) == [("A", mc.TYPE_FP16, [8]), ("B", mc.TYPE_FP32, [4])]
    assert _io(config.output) == [("O", mc.TYPE_FP32, [4])]


def test_complete_declared_max_batch_size_zero_keeps_full_shapes() -> None:
    config = _completed(
        'output [{ name: "O" data_type: TYPE_FP32 dims: [-1, 4] }]',
        [("A", "FP32", [-1, 4])],
        [("O", "FP32", [-1, 4])],
    )
    assert config.max_batch_size == 0
    assert _io(config.input) == [("A", mc.TYPE_FP32, [-1, 4])]


def test_load_parse_error_names_the_path(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "bad", 'backend: "onnxruntime" max_batch_size: x')
    raises_invalid_arg(
        model_config.load, model_dir, fragments=(str(model_dir / "config.pbtxt"), "failed")
    )


def test_load_name_mismatch_is_invalid_arg(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "folder", 'name: "other" backend: "python"' + ADD)
    raises_invalid_arg(
        model_config.load,
        model_dir,
        fragments=("'other'", "does not match its folder 'folder'"),
    )


def test_load_fills_missing_name_from_folder(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "unnamed", 'backend: "python"' + ADD)
    assert model_config.load(model_dir).name == "unnamed"


# framework detection: config text, files in the model folder, framework, platform, backend
FRAMEWORKS = [
    ('backend: "onnxruntime"', (), "onnxruntime", "onnxruntime_onnx", "onnxruntime"),
    ('backend: "pytorch"', (), "pytorch", "pytorch_libtorch", "pytorch"),
    ('backend: "tensorrt"', (), "tensorrt", "tensorrt_plan", "tensorrt"),
    ('backend: "python"', (), "python", "", "python"),
    ('platform: "onnxruntime_onnx"', (), "onnxruntime", "onnxruntime_onnx", "onnxruntime"),
    ('platform: "pytorch_libtorch"', (), "pytorch", "pytorch_libtorch", "pytorch"),
    ('platform: "tensorrt_plan"', (), "tensorrt", "tensorrt_plan", "tensorrt"),
    ('platform: "python"', (), "python", "python", "python"),
    ("", ("1/model.onnx",), "onnxruntime", "onnxruntime_onnx", "onnxruntime"),
    ("", ("1/model.pt",), "pytorch", "pytorch_libtorch", "pytorch"),
    ("", ("1/model.plan",), "tensorrt", "tensorrt_plan", "tensorrt"),
    ("", ("1/model.py",), "python", "", "python"),
    # A later version folder's file is found too.
    ("", ("1/readme.txt", "2/model.onnx"), "onnxruntime", "onnxruntime_onnx", "onnxruntime"),
    # backend wins over a file of another framework.
    ('backend: "python"', ("1/model.onnx",), "python", "", "python"),
]


@pytest.mark.parametrize(
    ("text", "files", "framework", "platform", "backend"),
    FRAMEWORKS,
    ids=[f"{t or 'file'}-{'+'.join(f)}" for t, f, *_ in FRAMEWORKS],
)
def test_framework_detection(
    tmp_path: Path,
    text: str,
    files: tuple[str, ...],
    framework: str,
    platform: str,
    backend: str,
) -> None:
    model_dir = write_model(tmp_path, "m", text + ADD, versions=(), files=files or ("1/x",))
    config = model_config.load(model_dir)
    assert model_config.framework_of(config, model_dir) == framework
    assert config.platform == platform
    assert config.backend == backend


@pytest.mark.parametrize(
    ("text", "files", "fragment"),
    [
        ('backend: "tensorflow"', ("1/model.savedmodel",), "backend 'tensorflow' is not supported"),
        ('platform: "tensorflow_savedmodel"', (), "platform 'tensorflow_savedmodel' is not"),
        ("", ("1/model.savedmodel",), "names no backend or platform"),
        ("", ("model.onnx",), "names no backend or platform"),  # not in a version folder
        ("", (), "names no backend or platform"),
    ],
    ids=["bad-backend", "bad-platform", "unknown-file", "file-outside-version", "no-files"],
)
def test_framework_detection_errors(
    tmp_path: Path, text: str, files: tuple[str, ...], fragment: str
) -> None:
    model_dir = write_model(tmp_path, "m", text + ADD, files=files)
    raises_invalid_arg(model_config.load, model_dir, fragments=(fragment, "'m'"))


def test_framework_of_without_folder(tmp_path: Path) -> None:
    config = model_config.parse_text('name: "m" platform: "onnxruntime_onnx"')
    assert model_config.framework_of(config) == "onnxruntime"
    raises_invalid_arg(
        model_config.framework_of, model_config.parse_text('name: "m"'), fragments=("no backend",)
    )


@pytest.mark.parametrize(
    ("text", "filename"),
    [
        ('backend: "onnxruntime"', "model.onnx"),
        ('backend: "pytorch"', "model.pt"),
        ('platform: "tensorrt_plan"', "model.plan"),
        ('backend: "python"', "model.py"),
        ('backend: "onnxruntime" default_model_filename: "net.onnx"', "net.onnx"),
    ],
)
def test_default_model_filename(tmp_path: Path, text: str, filename: str) -> None:
    config = model_config.load(write_model(tmp_path, "m", text + ADD))
    assert config.default_model_filename == filename


def test_complete_fills_triton_defaults(tmp_path: Path) -> None:
    config = model_config.load(write_model(tmp_path, "dm", 'backend: "onnxruntime"' + ADD))
    assert len(config.instance_group) == 1
    group = config.instance_group[0]
    assert group.name == "dm_0"
    assert group.count == 1
    assert group.kind == mc.ModelInstanceGroup.KIND_CPU
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1
    assert config.max_batch_size == 0
    assert model_config.instance_count(config) == 1


def test_complete_names_each_instance_group_and_keeps_given_values(tmp_path: Path) -> None:
    text = """
    backend: "onnxruntime"
    instance_group [
      { count: 2 kind: KIND_GPU gpus: [0] },
      { name: "mine" },
      { count: 3 kind: KIND_CPU }
    ]
    version_policy { all {} }
    """
    config = model_config.load(write_model(tmp_path, "ig", text + ADD))
    groups = config.instance_group
    assert [g.name for g in groups] == ["ig_0", "mine", "ig_2"]
    assert [g.count for g in groups] == [2, 1, 3]
    assert [g.kind for g in groups] == [
        mc.ModelInstanceGroup.KIND_GPU,
        mc.ModelInstanceGroup.KIND_CPU,
        mc.ModelInstanceGroup.KIND_CPU,
    ]
    assert model_config.instance_count(config) == 6
    assert config.version_policy.WhichOneof("policy_choice") == "all"


# --- validate ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("max_batch_size: -1" + ADD, "max_batch_size must be >= 0"),
        ("input [{ data_type: TYPE_FP32 dims: [1] }]", "has no name"),
        ("output [{ data_type: TYPE_FP32 dims: [1] }]", "has no name"),
        ('input [{ name: "x" dims: [1] }]', "'x' has no data_type"),
        ('output [{ name: "y" data_type: TYPE_INVALID dims: [1] }]', "'y' has no data_type"),
        ('input [{ name: "x" data_type: TYPE_FP32 dims: [4, 0] }]', "invalid dimension in [4, 0]"),
        ('input [{ name: "x" data_type: TYPE_FP32 dims: [-2] }]', "invalid dimension in [-2]"),
        ('output [{ name: "y" data_type: TYPE_FP32 dims: [3, -5] }]', "invalid dimension"),
        (
            'input [{ name: "x" data_type: TYPE_FP32 dims: [1] },'
            ' { name: "x" data_type: TYPE_INT32 dims: [2] }]',
            "input 'x' is declared twice",
        ),
    ],
    ids=[
        "negative-batch",
        "input-no-name",
        "output-no-name",
        "no-type",
        "invalid-type",
        "zero-dim",
        "below-minus-one",
        "output-bad-dim",
        "duplicate-input",
    ],
)
def test_validate_errors(tmp_path: Path, text: str, fragment: str) -> None:
    model_dir = write_model(tmp_path, "v", 'backend: "python"\n' + text)
    raises_invalid_arg(model_config.load, model_dir, fragments=(fragment, "model 'v'"))


@pytest.mark.parametrize(
    "dims", ["[-1]", "[-1, -1, 3]", "[1]", "[]", "[0]"], ids=lambda d: d.replace(" ", "")
)
def test_validate_accepts_dims(tmp_path: Path, dims: str) -> None:
    text = f'backend: "python" input [{{ name: "x" data_type: TYPE_FP32 dims: {dims} }}]'
    config = model_config.load(write_model(tmp_path, "ok", text))
    assert list(config.input[0].dims) == orjson.loads(dims)


# --- versions ---------------------------------------------------------------------------

FOLDERS = ("1", "2", "3", "10", "abc", "v4", "-1", "1.5", "latest")


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("", ["10"]),
        ("version_policy { latest { num_versions: 1 } }", ["10"]),
        ("version_policy { latest { num_versions: 2 } }", ["10", "3"]),
        ("version_policy { latest { num_versions: 9 } }", ["10", "3", "2", "1"]),
        ("version_policy { all {} }", ["10", "3", "2", "1"]),
        ("version_policy { specific { versions: [1, 10, 99] } }", ["10", "1"]),
        ("version_policy { specific { versions: [3] } }", ["3"]),
        ("version_policy { specific { versions: [4, 5] } }", []),
    ],
    ids=["default", "latest-1", "latest-2", "latest-9", "all", "specific", "specific-3", "none"],
)
def test_available_versions(tmp_path: Path, policy: str, expected: list[str]) -> None:
    model_dir = write_model(tmp_path, "vp", 'backend: "python"\n' + policy, versions=FOLDERS)
    (model_dir / "7").write_bytes(b"")  # a file, not a version folder
    config = model_config.load(model_dir)
    assert model_config.available_versions(config, model_dir) == expected


def test_available_versions_without_version_folders(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "nv", 'backend: "python"', versions=("abc",))
    config = model_config.load(model_dir)
    assert model_config.available_versions(config, model_dir) == []


def test_available_versions_ignores_superscript_digit_folder(tmp_path: Path) -> None:
    """'²'.isdigit() is true but int('²') fails: such a folder is simply not a version."""
    model_dir = write_model(tmp_path, "sd", 'backend: "python"', versions=("1", "²"))
    config = model_config.load(model_dir)
    assert model_config.available_versions(config, model_dir) == ["1"]


def test_zero_padded_folder_is_not_a_version(tmp_path: Path) -> None:
    """'01' would name version 1 but live in another folder than 1/: not a version."""
    model_dir = write_model(tmp_path, "zp", 'backend: "python"', versions=("2", "01", "0"))
    config = model_config.load(model_dir)
    assert model_config.available_versions(config, model_dir) == ["2"]


# --- JSON renderings --------------------------------------------------------------------

BATCHED = """
backend: "onnxruntime"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [-1, 16] },
  { name: "TEXT" data_type: TYPE_STRING dims: [1] optional: true }
]
output [{ name: "OUTPUT0" data_type: TYPE_INT64 dims: [4, 4] }]
version_policy { specific { versions: [1, 3] } }
"""


def test_config_json_renders_int64_as_numbers(tmp_path: Path) -> None:
    config = model_config.load(write_model(tmp_path, "cj", BATCHED))
    body = model_config.config_json(config)
    assert b'"dims":[-1,16]' in body
    assert b'"dims":["' not in body
    doc = orjson.loads(body)
    assert doc["name"] == "cj"
    assert doc["max_batch_size"] == 8
    assert doc["input"][0]["dims"] == [-1, 16]
    assert doc["input"][1]["dims"] == [1]
    assert doc["input"][1]["data_type"] == "TYPE_STRING"
    assert doc["input"][1]["optional"] is True
    assert doc["output"][0]["dims"] == [4, 4]
    assert doc["version_policy"] == {"specific": {"versions": [1, 3]}}
    assert doc["platform"] == "onnxruntime_onnx"
    assert doc["backend"] == "onnxruntime"


def test_config_json_includes_defaults(tmp_path: Path) -> None:
    config = model_config.load(write_model(tmp_path, "df", 'backend: "python"' + ADD))
    doc = orjson.loads(model_config.config_json(config))
    assert doc["max_batch_size"] == 0
    assert doc["input"][0]["optional"] is False
    assert doc["input"][0]["dims"] == [16]
    [group] = doc["instance_group"]
    assert (group["name"], group["kind"], group["count"]) == ("df_0", "KIND_CPU", 1)
    assert doc["version_policy"] == {"latest": {"num_versions": 1}}
    assert doc["default_model_filename"] == "model.py"
    assert doc["output"][0]["name"] == "OUTPUT0"


def test_config_json_nested_int64_fields(tmp_path: Path) -> None:
    text = """
    backend: "python"
    max_batch_size: 4
    dynamic_batching {
      max_queue_delay_microseconds: 100
      default_queue_policy { default_timeout_microseconds: 5000 max_queue_size: 3 }
      priority_levels: 2
      priority_queue_policy { key: 1 value { default_timeout_microseconds: 7 } }
    }
    """
    config = model_config.load(write_model(tmp_path, "nb", text + ADD))
    doc = orjson.loads(model_config.config_json(config))
    db = doc["dynamic_batching"]
    assert db["max_queue_delay_microseconds"] == 100
    assert db["default_queue_policy"]["default_timeout_microseconds"] == 5000
    assert db["priority_levels"] == 2
    assert db["priority_queue_policy"]["1"]["default_timeout_microseconds"] == 7

    text = 'backend: "python" sequence_batching { max_sequence_idle_microseconds: 9000000 }'
    config = model_config.load(write_model(tmp_path, "sb", text + ADD))
    doc = orjson.loads(model_config.config_json(config))
    assert doc["sequence_batching"]["max_sequence_idle_microseconds"] == 9000000


def test_metadata_json_with_batching(tmp_path: Path) -> None:
    config = model_config.load(write_model(tmp_path, "mb", BATCHED))
    doc = orjson.loads(model_config.metadata_json(config, ["3", "1"]))
    assert doc == {
        "name": "mb",
        "versions": ["3", "1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1, 16]},
            {"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]},
        ],
        "outputs": [{"name": "OUTPUT0", "datatype": "INT64", "shape": [-1, 4, 4]}],
    }


def test_metadata_json_without_batching(tmp_path: Path) -> None:
    text = """
    backend: "python"
    input [{ name: "A" data_type: TYPE_BOOL dims: [2, 3] }]
    output [{ name: "B" data_type: TYPE_FP16 dims: [-1] }]
    """
    config = model_config.load(write_model(tmp_path, "nb", text))
    doc = orjson.loads(model_config.metadata_json(config, []))
    assert doc == {
        "name": "nb",
        "versions": [],
        "platform": "python",
        "inputs": [{"name": "A", "datatype": "BOOL", "shape": [2, 3]}],
        "outputs": [{"name": "B", "datatype": "FP16", "shape": [-1]}],
    }


@pytest.mark.parametrize(
    ("config_type", "datatype"),
    [
        ("TYPE_STRING", "BYTES"),
        ("TYPE_FP32", "FP32"),
        ("TYPE_BF16", "BF16"),
        ("TYPE_UINT64", "UINT64"),
    ],
)
def test_datatype_of_io(config_type: str, datatype: str) -> None:
    config = model_config.parse_text(f'input [{{ name: "x" data_type: {config_type} }}]')
    assert model_config.datatype(config.input[0]) == datatype
