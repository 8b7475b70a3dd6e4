"""common/validate.py and services/scheduler/validate.py: request checks and version resolution against models
read from real model folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from despina.common import messages as m
from despina.common.errors import Code, ServerError
from despina.common.validate import check_request
from despina.services.scheduler.repository import Model, State, read_model
from despina.services.scheduler.validate import resolve_version

BATCHED = """
backend: "python"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [16] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [-1] },
  { name: "OPT" data_type: TYPE_FP64 dims: [2] optional: true },
  { name: "TEXT" data_type: TYPE_STRING dims: [1] optional: true }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [16] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [-1] }
]
"""

PLAIN = """
backend: "python"
input [
  { name: "X" data_type: TYPE_UINT8 dims: [-1, 16] },
  { name: "S" data_type: TYPE_BOOL dims: [] }
]
output [{ name: "Y" data_type: TYPE_UINT8 dims: [-1, 16] }]
"""

ITEM = {"FP32": 4, "INT32": 4, "FP64": 8, "UINT8": 1, "BOOL": 1, "INT64": 8}


def make_model(root: Path, name: str, config: str, versions: tuple[str, ...] = ("1",)) -> Model:
    model_dir = root / name
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text(config)
    for v in versions:
        (model_dir / v).mkdir()
    model = read_model(model_dir)
    assert model.config is not None, model.error
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    root = tmp_path_factory.mktemp("validate")
    return {
        "batched": make_model(root, "batched", BATCHED),
        "plain": make_model(root, "plain", PLAIN),
    }


def tensor(name: str, datatype: str, shape: list[int], frame: int = 0) -> m.Tensor:
    return m.Tensor(name, datatype, shape, m.Inline(frame))


def request(
    inputs: list[tuple[str, str, list[int]]],
    outputs: tuple[str, ...] = (),
    sizes: dict[int, int] | None = None,
) -> tuple[m.Infer, list]:
    """An Infer with inline inputs and byte buffers of the right size, except the input
    indexes in ``sizes``, whose buffers get that many bytes."""
    tensors, buffers = [], []
    for i, (name, datatype, shape) in enumerate(inputs):
        tensors.append(tensor(name, datatype, shape, i + 1))
        n = 1
        for d in shape:
            n *= max(d, 0)
        size = (sizes or {}).get(i, n * ITEM.get(datatype, 1))
        buffers.append(b"\x00" * size)
    req = m.Infer(rid=1, model="", version="", inputs=tensors, outputs=list(outputs), parameters={})
    return req, buffers


GOOD = [
    ("batched", [("INPUT0", "FP32", [1, 16]), ("INPUT1", "INT32", [1, 5])], ()),
    ("batched", [("INPUT1", "INT32", [8, 0]), ("INPUT0", "FP32", [8, 16])], ("OUTPUT1",)),
    (
        "batched",
        [
            ("INPUT0", "FP32", [2, 16]),
            ("INPUT1", "INT32", [2, 3]),
            ("OPT", "FP64", [2, 2]),
            ("TEXT", "BYTES", [2, 1]),
        ],
        ("OUTPUT0", "OUTPUT1"),
    ),
    ("plain", [("X", "UINT8", [3, 16]), ("S", "BOOL", [])], ("Y",)),
    ("plain", [("S", "BOOL", []), ("X", "UINT8", [0, 16])], ()),
]


@pytest.mark.parametrize(("model", "inputs", "outputs"), GOOD)
def test_good_requests_pass(models: dict[str, Model], model: str, inputs, outputs) -> None:
    req, buffers = request(inputs, outputs)
    check_request(models[model].signature, req, buffers)


B0 = ("INPUT0", "FP32", [1, 16])
B1 = ("INPUT1", "INT32", [1, 4])

BAD = [
    (
        "wrong-dtype",
        "batched",
        [("INPUT0", "FP64", [1, 16]), B1],
        (),
        None,
        "inference input 'INPUT0' data-type is 'FP64', but model 'batched' expects 'FP32'",
    ),
    (
        "wrong-shape",
        "batched",
        [("INPUT0", "FP32", [1, 15]), B1],
        (),
        None,
        "unexpected shape for input 'INPUT0' for model 'batched'. Expected [-1,16], got [1,15]",
    ),
    (
        "missing-batch-dim",
        "batched",
        [("INPUT0", "FP32", [16]), B1],
        (),
        None,
        "Expected [-1,16], got [16]. NOTE: Setting a non-zero max_batch_size",
    ),
    (
        "negative-dim",
        "batched",
        [B0, ("INPUT1", "INT32", [1, -1])],
        (),
        None,
        "Expected [-1,-1], got [1,-1]",
    ),
    (
        "plain-shape",
        "plain",
        [("X", "UINT8", [16]), ("S", "BOOL", [])],
        (),
        None,
        "unexpected shape for input 'X' for model 'plain'. Expected [-1,16], got [16].",
    ),
    (
        "plain-scalar-shape",
        "plain",
        [("X", "UINT8", [1, 16]), ("S", "BOOL", [1])],
        (),
        None,
        "Expected [], got [1].",
    ),
    (
        "batch-too-large",
        "batched",
        [("INPUT0", "FP32", [9, 16]), ("INPUT1", "INT32", [9, 1])],
        (),
        None,
        "inference request batch-size must be <= 8 for 'batched'",
    ),
    (
        "mismatched-batch",
        "batched",
        [("INPUT0", "FP32", [2, 16]), ("INPUT1", "INT32", [3, 4])],
        (),
        None,
        "input 'INPUT1' batch size 3 does not match other inputs' batch size 2 for model 'batched'",
    ),
    (
        "missing-input",
        "batched",
        [B0],
        (),
        None,
        "expected 2 inputs but got 1 inputs for model 'batched'. Got input(s) ['INPUT0'], "
        "but missing required input(s) ['INPUT1']",
    ),
    (
        "missing-with-optional",
        "batched",
        [("OPT", "FP64", [1, 2]), B1],
        (),
        None,
        "missing required input(s) ['INPUT0']",
    ),
    (
        "no-inputs",
        "plain",
        [],
        (),
        None,
        "missing required input(s) ['X', 'S']",
    ),
    (
        "unexpected-input",
        "batched",
        [B0, B1, ("EXTRA", "FP32", [1, 1])],
        (),
        None,
        "unexpected inference input 'EXTRA' for model 'batched'",
    ),
    (
        "duplicated-input",
        "batched",
        [B0, B1, B0],
        (),
        None,
        "input 'INPUT0' is given more than once for model 'batched'",
    ),
    (
        "zero-dim-beside-a-huge-one",
        "batched",
        [("INPUT0", "FP32", [0, 16]), ("INPUT1", "INT32", [0, 2**62])],
        (),
        None,
        "byte size overflow for input 'INPUT1': shape [0,4611686018427387904] spans more "
        "than 576460752303423488 elements",
    ),
    (
        "count-past-int64",
        "plain",
        [("X", "UINT8", [2**60, 16]), ("S", "BOOL", [])],
        (),
        {0: 0},
        "input 'X' shape [1152921504606846976,16] causes total element count to exceed "
        "maximum size of 9223372036854775807",
    ),
    (
        "byte-size-short",
        "batched",
        [B0, B1],
        (),
        {0: 60},
        "input byte size mismatch for input 'INPUT0' for model 'batched'. Expected 64, got 60",
    ),
    (
        "byte-size-long",
        "plain",
        [("X", "UINT8", [2, 16]), ("S", "BOOL", [])],
        (),
        {1: 2},
        "input byte size mismatch for input 'S' for model 'plain'. Expected 1, got 2",
    ),
    (
        "unknown-output",
        "batched",
        [B0, B1],
        ("OUTPUT0", "NOPE"),
        None,
        "unexpected inference output 'NOPE' for model 'batched'",
    ),
    (
        "input-name-as-output",
        "plain",
        [("X", "UINT8", [1, 16]), ("S", "BOOL", [])],
        ("X",),
        None,
        "unexpected inference output 'X' for model 'plain'",
    ),
]


@pytest.mark.parametrize(
    ("model", "inputs", "outputs", "sizes", "message"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_bad_requests_are_invalid_arg(
    models: dict[str, Model], model: str, inputs, outputs, sizes, message: str
) -> None:
    req, buffers = request(inputs, outputs, sizes)
    with pytest.raises(ServerError) as exc_info:
        check_request(models[model].signature, req, buffers)
    assert exc_info.value.code is Code.INVALID_ARG
    assert message in exc_info.value.message, exc_info.value.message


def test_non_batched_shape_error_has_no_batch_note(models: dict[str, Model]) -> None:
    req, buffers = request([("X", "UINT8", [16]), ("S", "BOOL", [])])
    with pytest.raises(ServerError) as exc_info:
        check_request(models["plain"].signature, req, buffers)
    assert "NOTE" not in exc_info.value.message


def test_bytes_inputs_skip_the_byte_size_check(models: dict[str, Model]) -> None:
    req, buffers = request([B0, B1, ("TEXT", "BYTES", [1, 1])], sizes={2: 3})
    check_request(models["batched"].signature, req, buffers)


@pytest.mark.parametrize(("size", "ok"), [(64, True), (63, False), (128, False), (0, False)])
def test_shm_inputs_use_the_ref_size(models: dict[str, Model], size: int, ok: bool) -> None:
    req = m.Infer(
        rid=7,
        model="batched",
        version="",
        inputs=[
            m.Tensor("INPUT0", "FP32", [1, 16], m.Shm("despina_x", 4096, size)),
            m.Tensor("INPUT1", "INT32", [1, 2], m.Inline(1)),
        ],
        outputs=[],
        parameters={},
    )
    buffers = [None, b"\x00" * 8]
    if ok:
        check_request(models["batched"].signature, req, buffers)
        return
    with pytest.raises(ServerError) as exc_info:
        check_request(models["batched"].signature, req, buffers)
    assert exc_info.value.code is Code.INVALID_ARG
    assert f"Expected 64, got {size}" in exc_info.value.message


# --- resolve_version ------------------------------------------------------------------

VERSIONED = 'backend: "python" version_policy { all {} }'


@pytest.fixture()
def versioned(tmp_path: Path) -> Model:
    """Versions 1, 2, 9, 10: 1, 9 and 10 ready; 2 failed with a reason."""
    model = make_model(tmp_path, "vm", VERSIONED, versions=("1", "2", "9", "10"))
    assert sorted(model.versions) == ["1", "10", "2", "9"]
    for v in ("1", "9", "10"):
        model.versions[v].state = State.READY
    model.versions["2"].state = State.UNAVAILABLE
    model.versions["2"].reason = "version 2: load failed"
    return model


@pytest.mark.parametrize(("asked", "got"), [("", "10"), ("1", "1"), ("9", "9"), ("10", "10")])
def test_resolve_version_ready(versioned: Model, asked: str, got: str) -> None:
    assert resolve_version(versioned, asked) == got


def test_resolve_version_default_skips_versions_not_ready(versioned: Model) -> None:
    versioned.versions["10"].state = State.LOADING
    versioned.versions["9"].state = State.UNLOADING
    assert resolve_version(versioned, "") == "1"


@pytest.mark.parametrize("asked", ["3", "0", "01", "latest", "-1"])
def test_resolve_unknown_version_is_not_found(versioned: Model, asked: str) -> None:
    with pytest.raises(ServerError) as exc_info:
        resolve_version(versioned, asked)
    assert exc_info.value.code is Code.NOT_FOUND
    assert exc_info.value.message == (
        f"Request for unknown model: 'vm' version {asked} is not found"
    )


@pytest.mark.parametrize("state", [State.LOADING, State.UNAVAILABLE, State.UNLOADING])
def test_resolve_version_not_ready_is_unavailable(versioned: Model, state: State) -> None:
    versioned.versions["9"].state = state
    with pytest.raises(ServerError) as exc_info:
        resolve_version(versioned, "9")
    assert exc_info.value.code is Code.UNAVAILABLE
    assert "'vm' version 9 is not ready" in exc_info.value.message
    assert "version 2: load failed" in exc_info.value.message


def test_resolve_default_with_nothing_ready_is_unavailable(versioned: Model) -> None:
    for mv in versioned.versions.values():
        mv.state = State.LOADING
    with pytest.raises(ServerError) as exc_info:
        resolve_version(versioned, "")
    assert exc_info.value.code is Code.UNAVAILABLE
    assert exc_info.value.message == (
        "Request for unknown model: 'vm' has no available versions (version 2: load failed)"
    )


def test_versions_start_loading_so_nothing_resolves(tmp_path: Path) -> None:
    model = make_model(tmp_path, "fresh", VERSIONED, versions=("1",))
    assert model.versions["1"].state is State.LOADING
    with pytest.raises(ServerError) as exc_info:
        resolve_version(model, "1")
    assert exc_info.value.code is Code.UNAVAILABLE


def test_resolve_version_of_a_broken_model_is_unavailable(tmp_path: Path) -> None:
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text("max_batch_size: nope")
    (model_dir / "1").mkdir()
    model = read_model(model_dir)
    assert model.config is None
    with pytest.raises(ServerError) as exc_info:
        resolve_version(model, "")
    assert exc_info.value.code is Code.UNAVAILABLE
    assert "'broken' has no available versions" in exc_info.value.message
    assert "failed to parse" in exc_info.value.message
