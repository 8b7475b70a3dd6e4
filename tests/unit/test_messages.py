"""common/messages.py: every message round-trips through the decoder of the socket that
receives it, and nothing else decodes by accident."""

from __future__ import annotations

from typing import get_args

import msgspec
import pytest

from despina.common import messages as m


def tensors() -> list[m.Tensor]:
    return [
        m.Tensor("INPUT0", "FP32", [2, 16], m.Inline(1)),
        m.Tensor("TEXT", "BYTES", [], m.Shm("despina_fe_1_abc_0", 4096, 37)),
        m.Tensor("EMPTY", "INT64", [0, 3], m.Inline(0)),
    ]


def infer(rid: int = 1, **kw: object) -> m.Infer:
    return m.Infer(
        rid=rid,
        model="simple",
        version="1",
        inputs=tensors(),
        outputs=["OUTPUT0", "OUTPUT1"],
        parameters={"flag": True, "n": 3, "x": 0.5, "s": "text", "big": 2**62},
        **kw,  # type: ignore[arg-type]
    )


def reply(rid: int, error: m.Error | None = None) -> m.InferReply:
    return m.InferReply(rid=rid, model="simple", version="1", outputs=tensors(), error=error)


FROM_FRONTEND = [
    m.FrontendHello(protocol=m.PROTOCOL_VERSION, reply_endpoint="tcp://127.0.0.1:5555"),
    m.InferBatch(reply_to="ipc:///tmp/fe", requests=[infer(1), infer(2, request_id="abc")]),
    m.InferBatch(reply_to="", requests=[]),
    m.Query(qid=4, kind="server_ready"),
    m.Query(qid=5, kind="model_metadata", model="simple", version="2"),
    m.Query(qid=6, kind="repository_index"),
    m.Query(qid=7, kind="trace_setting", model="simple", body=b'{"trace_rate": null}'),
    m.Query(qid=8, kind="log_settings"),
    m.Cancel(reply_to="tcp://fe:8011", rids=[3, 9]),
    m.StatsReport(
        models=[
            m.control.ModelStatistics(
                "simple", "", success_count=2, success_ns=900, fail={"REJECTED": [1, 40]}
            )
        ]
    ),
    m.StatsReport(models=[], flushed=12),  # the answer to a StatsFlush, empty
]

FROM_HOST = [
    m.HostHello(protocol=1, host_id="h1", framework="onnxruntime", pid=1234),
    m.HostHello(
        protocol=1,
        host_id="py-1",
        framework="python",
        pid=99,
        instance_of=("model", "1", 2),
        load_error="initialize() raised ValueError",
    ),
    m.LoadResult(model="simple", version="1", instances=[0, 1]),
    m.LoadResult(model="simple", version="1", instances=[], error="no model.onnx"),
    m.LoadResult(model="simple", version="1", instances=[0], config=b"\n\x06simple"),
    m.Completion(host_id="h1", done=[("simple", "1", 0, [1, 2, 3]), ("other", "2", 1, [])]),
    m.Completion(host_id="h1", done=[]),
    m.Completion(host_id="h1", done=[], undelivered=[("tcp://fe:1", 7, "simple", "1")]),
    m.StatsReport(
        models=[
            m.control.ModelStatistics(
                "simple",
                "1",
                execution_count=1,
                batch={4: [1, 10, 20, 30]},
                stages={"compute": [0, 4] + [0] * 17},
            )
        ]
    ),
    m.Heartbeat(host_id="onnxruntime-12-ab"),
]

# The logging and trace settings every frontend and host is sent (settings_store.py).
SETTINGS = m.Settings(
    log={"log_info": True, "log_verbose_level": 2, "log_format": "ISO8601", "log_file": ""},
    trace={"": {"trace_level": ["TIMESTAMPS"], "trace_rate": ["2"]}, "simple": {}},
)

FRONTEND_INBOUND = [
    m.ReplyBatch(replies=[reply(1), reply(2, m.Error("INVALID_ARG", "bad input"))]),
    m.ReplyBatch(replies=[m.InferReply(rid=3)]),
    m.ReplyBatch(replies=[]),
    m.QueryReply(qid=1, body=b'{"name":"simple"}'),
    m.QueryReply(qid=2, body=b"\x00\xff", error=None),
    m.QueryReply(qid=3, error=m.Error("NOT_FOUND", "no model 'x'")),
    m.Routes(
        routes=[
            m.Route(
                model="simple",
                version="1",
                default=True,
                signature=m.Signature(
                    name="simple",
                    max_batch_size=8,
                    inputs={"INPUT0": ("INT32", [16]), "TEXT": ("BYTES", [-1])},
                    required=["INPUT0"],
                    outputs=["OUTPUT0"],
                ),
                instances=[("onnxruntime-12-ab", 0), ("onnxruntime-13-cd", 1)],
            )
        ]
    ),
    m.Routes(routes=[]),
    m.HostLink(host_id="python-add_sub-1-0-77"),
    m.HostGone(host_id="onnxruntime-12-ab", why="stopped answering (no heartbeat for 3.1 s)"),
    SETTINGS,
    m.StatsFlush(token=1),
]

HOST_INBOUND = [
    m.LoadModel(
        model="simple",
        version="1",
        model_dir="/models/simple",
        config=b"\n\x06simple\x10\x08",
        instances=[0, 2],
    ),
    m.UnloadModel(model="simple", version="1"),
    m.ExecuteBatch(
        executions=[
            m.Execution(
                model="simple",
                version="1",
                instance=0,
                requests=[infer(1, sid=10, reply_to="tcp://fe:1"), infer(2, sid=11)],
            ),
            m.Execution(model="other", version="3", instance=2, requests=[]),
        ]
    ),
    m.ExecuteBatch(executions=[]),
    m.Introduce(endpoints=["unix:///tmp/despina-x/frontend-0", "tcp://fe:8020"]),
    m.Cancel(reply_to="unix:///tmp/despina-x/frontend-0", rids=[]),
    SETTINGS,
    m.StatsFlush(token=3),
    m.Settings(log={"log_verbose_level": 0}),
]

SOCKETS = [
    ("scheduler-frontends", m.SchedulerFromFrontend, FROM_FRONTEND),
    ("scheduler-hosts", m.SchedulerFromHost, FROM_HOST),
    ("frontend", m.FrontendInbound, FRONTEND_INBOUND),
    ("host", m.HostInbound, HOST_INBOUND),
    (
        "host-from-frontend",
        m.HostFromFrontend,
        [
            m.Release(blocks=[("despina_bh_1_ab_0", 4096)]),
            m.ExecuteBatch(
                executions=[m.Execution("simple", "1", 0, [infer(3, reply_to="unix:///tmp/fe")])]
            ),
            m.Cancel(reply_to="unix:///tmp/fe", rids=[3]),
        ],
    ),
]
CASES = [(union, msg) for _, union, msgs in SOCKETS for msg in msgs]
CASE_IDS = [
    f"{name}-{type(msg).__name__}-{i}" for name, _, msgs in SOCKETS for i, msg in enumerate(msgs)
]


def test_every_message_a_socket_receives_is_tested() -> None:
    for _, union, msgs in SOCKETS:
        assert set(get_args(union) or (union,)) == {type(msg) for msg in msgs}


@pytest.mark.parametrize(("union", "msg"), CASES, ids=CASE_IDS)
def test_round_trip(union: object, msg: msgspec.Struct) -> None:
    wire = m.encoder().encode(msg)
    out = m.decoder(union).decode(wire)
    assert type(out) is type(msg)
    assert out == msg


@pytest.mark.parametrize(("union", "msg"), CASES, ids=CASE_IDS)
def test_other_sockets_refuse_the_message(union: object, msg: msgspec.Struct) -> None:
    wire = m.encoder().encode(msg)
    for _, other, _ in SOCKETS:
        if type(msg) in (get_args(other) or (other,)):
            continue  # a host takes ExecuteBatch from the scheduler and from frontends
        with pytest.raises(msgspec.DecodeError):
            m.decoder(other).decode(wire)


def test_nested_structs_keep_their_types() -> None:
    batch = m.InferBatch(reply_to="x", requests=[infer(7)])
    out = m.decoder(m.SchedulerFromFrontend).decode(m.encoder().encode(batch))
    assert isinstance(out, m.InferBatch)
    [req] = out.requests
    assert isinstance(req, m.Infer)
    assert [type(t.ref) for t in req.inputs] == [m.Inline, m.Shm, m.Inline]
    assert req.inputs[0].ref == m.Inline(1)
    assert req.inputs[1].ref == m.Shm("despina_fe_1_abc_0", 4096, 37)
    # Parameter values keep their JSON type: a bool is not an int, a float is not an int.
    assert req.parameters == {"flag": True, "n": 3, "x": 0.5, "s": "text", "big": 2**62}
    assert [type(v) for v in req.parameters.values()] == [bool, int, float, str, int]
    assert (req.request_id, req.sid, req.reply_to) == ("", 0, "")


@pytest.mark.parametrize(
    "ref", [m.Inline(0), m.Inline(12), m.Shm("k", 0, 0), m.Shm("despina_x_3", 2**40, 2**33)]
)
def test_tensor_ref_decodes_to_its_class(ref: m.TensorRef) -> None:
    t = m.Tensor("x", "UINT8", [1], ref)
    out = msgspec.msgpack.decode(m.encoder().encode(t), type=m.Tensor)
    assert type(out.ref) is type(ref)
    assert out.ref == ref


def test_hello_carries_the_protocol_version() -> None:
    hello = m.FrontendHello(protocol=m.PROTOCOL_VERSION, reply_endpoint="e")
    out = m.decoder(m.SchedulerFromFrontend).decode(m.encoder().encode(hello))
    assert out.protocol == m.PROTOCOL_VERSION == 2


def test_trailing_default_fields_may_be_omitted() -> None:
    # An older peer that does not send fields added at the end still decodes.
    query = m.decoder(m.SchedulerFromFrontend).decode(
        msgspec.msgpack.encode(["query", 9, "model_ready"])
    )
    assert query == m.Query(qid=9, kind="model_ready", model="", version="")
    hello = m.decoder(m.SchedulerFromHost).decode(
        msgspec.msgpack.encode(["host_hello", 1, "h", "onnxruntime", 5])
    )
    assert hello == m.HostHello(protocol=1, host_id="h", framework="onnxruntime", pid=5)
    assert hello.instance_of is None and hello.load_error == ""


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"\x93",  # an array header with no elements after it
        m.encoder().encode(m.UnloadModel(model="m", version="1"))[:-1],  # truncated
        b"not msgpack at all",
        msgspec.msgpack.encode({"host_id": "h"}),  # a map, not a tagged array
        msgspec.msgpack.encode(["no_such_tag", 1]),
        msgspec.msgpack.encode(["hb"]),  # missing a required field
        msgspec.msgpack.encode(["hb", 42]),  # wrong field type
        msgspec.msgpack.encode(["query", 1, "bogus_kind"]),  # not a QueryKind
        msgspec.msgpack.encode(["fe_hello", "1", "e"]),  # protocol must be an int
        msgspec.msgpack.encode(
            ["infer", "e", [[1, "m", "1", [["x", "FP32", [1], ["z", 0]]], [], {}]]]
        ),
        msgspec.msgpack.encode(["infer", "e", [[1, "m", "1", [], [], {"p": [1]}]]]),
    ],
    ids=[
        "empty",
        "reserved-byte",
        "short-array",
        "truncated",
        "text",
        "map",
        "unknown-tag",
        "missing-field",
        "wrong-type",
        "bad-literal",
        "str-for-int",
        "unknown-ref-tag",
        "list-param",
    ],
)
def test_undecodable_bytes_raise_decode_error(wire: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        m.decoder(m.SchedulerFromFrontend).decode(wire)


def test_validation_errors_are_decode_errors() -> None:
    # Receivers catch one exception type for every bad frame.
    assert issubclass(msgspec.ValidationError, msgspec.DecodeError)


def test_a_direct_execution_says_so_and_an_old_peers_execution_is_scheduled() -> None:
    """``Execution.direct`` marks a frontend's request sent straight to a host; a header
    without the field (a peer from before it) decodes as scheduled."""
    decode = m.decoder(m.HostFromFrontend).decode
    direct = m.ExecuteBatch([m.Execution("simple", "1", 0, [infer(3)], True)])
    [out] = decode(m.encoder().encode(direct)).executions  # type: ignore[union-attr]
    assert (out.direct, out.requests[0].sid) == (True, 0)
    old = msgspec.msgpack.encode(["exec", [["simple", "1", 0, []]]])
    [scheduled] = decode(old).executions  # type: ignore[union-attr]
    assert (scheduled.model, scheduled.direct) == ("simple", False)
