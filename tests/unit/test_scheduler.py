"""The scheduler (services/scheduler/) driven over its real wire, in this process: a
``SchedulerServer`` listens on a unix socket, and the test plays a backend host and a
frontend with real ``streams.connect`` links speaking ``common.messages``. Checked: a
host's hello gets a load order, its load result makes the model ready and published as
a direct route, a request is routed to the host with its bytes and freed by the host's
completion, an undeliverable reply comes back as an error, a host that goes away fails
its in-flight requests with UNAVAILABLE, and control queries are answered as typed
records that the frontend's encoders turn into Triton's bytes and protobuf."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import msgspec
import orjson
import pytest
import uvloop
from google.protobuf import json_format

from despina.common import control as c
from despina.common import messages as m
from despina.common import model_config, streams
from despina.common.protos import service_pb2 as pb
from despina.services.frontend import control as encode
from despina.services.scheduler.repository import read_model
from despina.services.scheduler.server import SchedulerServer

CONFIG = """
name: "add"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
REPLY_TO = "unix:///nowhere/frontend-replies"


def make_repository(root: Path) -> Path:
    model = root / "repo" / "add"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(CONFIG)
    (root / "repo" / "broken").mkdir()  # no config.pbtxt: UNAVAILABLE, with its reason
    return root / "repo"


class Peer:
    """One end of a real stream to the scheduler: what it received, decoded."""

    def __init__(self, kind: object) -> None:
        self.decode = m.decoder(kind).decode
        self.got: list[tuple[msgspec.Struct, list]] = []
        self.arrived = asyncio.Event()
        self.link: streams.FramedProtocol | None = None

    def on_burst(self, _link: streams.FramedProtocol, burst: list[list]) -> None:
        for frames in burst:
            self.got.append((self.decode(frames[0]), frames[1:]))
        self.arrived.set()

    async def connect(self, endpoint: str) -> Peer:
        self.link = await streams.connect(endpoint, self.on_burst)
        return self

    def send(self, msg: msgspec.Struct, *frames: bytes) -> None:
        assert self.link is not None
        self.link.send([m.encoder().encode(msg), *frames])

    async def next(self, kind: type, timeout: float = 5.0) -> tuple:
        """The first message of ``kind`` not taken yet (and its tensor frames)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for i, (msg, frames) in enumerate(self.got):
                if isinstance(msg, kind):
                    del self.got[i]
                    return msg, frames
            self.arrived.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__} came; got {self.got}")
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except asyncio.TimeoutError:
                pass


def infer(rid: int) -> m.InferBatch:
    tensor = m.Tensor("INPUT0", "FP32", [1, 4], m.Inline(1))
    return m.InferBatch(REPLY_TO, [m.Infer(rid, "add", "", [tensor], [], {})])


def run_scheduler(tmp_path: Path, scenario: Callable, **server_args) -> None:
    """Start a SchedulerServer (with ``server_args``) on a unix socket under
    ``tmp_path``, run ``scenario(server, endpoint)`` against it, stop it."""
    endpoint = f"unix://{tmp_path}/scheduler.sock"
    repo = make_repository(tmp_path)

    async def main() -> None:
        server = SchedulerServer("", endpoint, [repo], **server_args)
        task = asyncio.create_task(server.run())
        for _ in range(200):
            if (tmp_path / "scheduler.sock").exists():
                break
            await asyncio.sleep(0.01)
        try:
            await scenario(server, endpoint)
        finally:
            server.stop()
            await asyncio.wait_for(task, 5)

    uvloop.run(main())


async def join(endpoint: str) -> tuple[Peer, Peer]:
    """A host that joins and loads ``add`` 1, and a frontend that says hello."""
    host = await Peer(m.HostInbound).connect(endpoint)
    host.send(m.HostHello(m.PROTOCOL_VERSION, "host-1", "onnxruntime", 4242))
    load, _ = await host.next(m.LoadModel)
    assert (load.model, load.version, load.instances) == ("add", "1", [0])
    host.send(m.LoadResult("add", "1", [0]))
    frontend = await Peer(m.FrontendInbound).connect(endpoint)
    frontend.send(m.FrontendHello(m.PROTOCOL_VERSION, REPLY_TO))
    return host, frontend


def test_hello_load_place_route_infer_and_complete(tmp_path: Path) -> None:
    data = bytes(range(16))

    async def scenario(server: SchedulerServer, endpoint: str) -> None:
        host, frontend = await join(endpoint)
        routes, _ = await frontend.next(m.Routes)
        assert [(r.model, r.version, r.default, r.instances) for r in routes.routes] == [
            ("add", "1", True, [("host-1", 0)])
        ]
        introduce, _ = await host.next(m.Introduce)
        assert introduce.endpoints == [REPLY_TO]

        frontend.send(infer(7), data)
        batch, frames = await host.next(m.ExecuteBatch)
        [execution] = batch.executions
        assert (execution.model, execution.version, execution.instance) == ("add", "1", 0)
        [req] = execution.requests
        assert (req.rid, req.version, req.reply_to) == (7, "1", REPLY_TO)
        assert req.sid > 0 and bytes(frames[req.inputs[0].ref.frame - 1]) == data
        assert list(server.dispatcher.inflight) == [req.sid]

        # The host ran it, but its reply could not reach the frontend: the scheduler
        # answers the request with an error, and the instance is free again.
        host.send(m.Completion("host-1", [("add", "1", 0, [req.sid])], [(REPLY_TO, 7, "add", "1")]))
        replies, _ = await frontend.next(m.ReplyBatch)
        [reply] = replies.replies
        assert reply.rid == 7 and reply.error is not None
        assert reply.error.code == "UNAVAILABLE"
        assert REPLY_TO in reply.error.message
        assert server.dispatcher.inflight == {}
        [slot] = server.schedulers[("add", "1")].slots  # type: ignore[attr-defined]
        assert (slot.busy, slot.index) == (0, 0)

        # A request the scheduler refuses is answered at once, not sent.
        frontend.send(m.InferBatch(REPLY_TO, [m.Infer(8, "nope", "", [], [], {})]))
        replies, _ = await frontend.next(m.ReplyBatch)
        assert [(r.rid, r.error.code if r.error else None) for r in replies.replies] == [
            (8, "NOT_FOUND")
        ]

    run_scheduler(tmp_path, scenario)


def test_host_lost_fails_in_flight_and_unpublishes(tmp_path: Path) -> None:
    data = bytes(16)

    async def scenario(server: SchedulerServer, endpoint: str) -> None:
        host, frontend = await join(endpoint)
        await frontend.next(m.Routes)
        frontend.send(infer(11), data)
        await host.next(m.ExecuteBatch)
        assert host.link is not None
        host.link.close()
        replies, _ = await frontend.next(m.ReplyBatch)
        [reply] = replies.replies
        assert (reply.rid, reply.model, reply.version) == (11, "add", "1")
        assert reply.error is not None and reply.error.code == "UNAVAILABLE"
        assert reply.error.message == (
            "the backend host running the model (onnxruntime, pid 4242) exited while the "
            "request was in flight"
        )
        routes, _ = await frontend.next(m.Routes)
        assert routes.routes == []
        assert server.dispatcher.inflight == {} and server.hosts == {}
        mv = server.models["add"].versions["1"]
        assert (mv.state.value, mv.reason) == (
            "UNAVAILABLE",
            "its backend host (onnxruntime, pid 4242) exited",
        )

        # A host of the same framework that joins gets the model to load again.
        again = await Peer(m.HostInbound).connect(endpoint)
        again.send(m.HostHello(m.PROTOCOL_VERSION, "host-2", "onnxruntime", 4343))
        load, _ = await again.next(m.LoadModel)
        assert (load.model, load.version) == ("add", "1")

    run_scheduler(tmp_path, scenario)


def test_control_queries_are_typed_records(tmp_path: Path) -> None:
    async def scenario(server: SchedulerServer, endpoint: str) -> None:
        host, frontend = await join(endpoint)
        await frontend.next(m.Routes)

        async def ask(qid: int, kind: m.QueryKind, model: str = "") -> m.QueryReply:
            frontend.send(m.Query(qid, kind, model))
            while True:
                reply, _ = await frontend.next(m.QueryReply)
                if reply.qid == qid:
                    return reply

        meta = await ask(1, "model_metadata", "add")
        assert meta.error is None
        assert meta.record == c.ModelMetadata(
            "add",
            ["1"],
            "onnxruntime_onnx",  # completed from the backend, as Triton does
            [c.TensorMetadata("INPUT0", "FP32", [-1, 4])],
            [c.TensorMetadata("OUTPUT0", "FP32", [-1, 4])],
        )
        config = await ask(2, "model_config", "add")
        assert isinstance(config.record, c.ModelConfig)
        assert orjson.loads(config.record.json)["max_batch_size"] == 8
        assert encode.model_config_pb(config.record).config.input[0].name == "INPUT0"

        index = await ask(3, "repository_index")
        assert index.record == c.RepositoryIndex(
            [
                c.IndexEntry("add", "1", "READY", ""),
                c.IndexEntry(
                    "broken",
                    None,
                    "UNAVAILABLE",
                    server.models["broken"].error,
                ),
            ]
        )
        assert "config.pbtxt" in server.models["broken"].error
        ready = await ask(4, "model_ready", "add")
        assert (ready.record, ready.error) == (None, None)
        missing = await ask(5, "model_metadata", "nope")
        assert missing.record is None and missing.error == m.Error(
            "NOT_FOUND", "Request for unknown model: 'nope' is not found"
        )
        status = await ask(6, "shm_status")
        assert status.record == c.ShmStatus([])
        unknown = await ask(7, "cuda_shm_status", "r")
        assert unknown.error == m.Error(
            "NOT_FOUND", "Unable to find cuda shared memory region: 'r'"
        )

    run_scheduler(tmp_path, scenario)


# --- the frontend's encoders: today's bytes and protobuf ------------------------------------


def test_encoders_give_the_json_and_protobuf_of_before(tmp_path: Path) -> None:
    """HTTP: the bytes the scheduler sent before the records (model_config.metadata_json,
    orjson of the index and status dicts); gRPC: the protobuf the frontend parsed from
    them (json_format), field for field."""
    model = read_model(make_repository(tmp_path) / "add")
    config = model.config
    assert config is not None and model.config_record is not None
    model.versions["1"].state = model.versions["1"].state.READY
    meta = model.metadata()
    before = model_config.metadata_json(config, ["1"])
    assert encode.model_metadata_json(meta) == before
    assert encode.model_metadata_pb(meta) == json_format.Parse(
        before, pb.ModelMetadataResponse(), ignore_unknown_fields=True
    )

    record = model.config_record
    assert encode.model_config_json(record) == model_config.config_json(config)
    parsed = pb.ModelConfigResponse()
    json_format.Parse(record.json, parsed.config, ignore_unknown_fields=True)
    assert encode.model_config_pb(record) == parsed

    index = c.RepositoryIndex(
        [c.IndexEntry("a", "1", "READY", ""), c.IndexEntry("b", None, "UNAVAILABLE", "why")]
    )
    dicts = [
        {"name": "a", "version": "1", "state": "READY", "reason": ""},
        {"name": "b", "state": "UNAVAILABLE", "reason": "why"},
    ]
    assert encode.repository_index_json(index) == orjson.dumps(dicts)
    for ready_only in (False, True):
        expected = pb.RepositoryIndexResponse()
        for entry in dicts:
            if not ready_only or entry["state"] == "READY":
                json_format.ParseDict(entry, expected.models.add())
        assert encode.repository_index_pb(index, ready_only) == expected

    shm = c.ShmStatus([c.ShmRegionStatus("r", "/k", 8, 64)])
    shm_dicts = [{"name": "r", "key": "/k", "offset": 8, "byte_size": 64}]
    assert encode.shm_status_any_json(shm) == orjson.dumps(shm_dicts)
    expected_shm = pb.SystemSharedMemoryStatusResponse()
    json_format.ParseDict(shm_dicts[0], expected_shm.regions["r"])
    assert encode.shm_status_any_pb(shm) == expected_shm

    cuda = c.CudaShmStatus([c.CudaShmRegionStatus("g", 1, 256)])
    cuda_dicts = [{"name": "g", "device_id": 1, "byte_size": 256}]
    assert encode.shm_status_any_json(cuda) == orjson.dumps(cuda_dicts)
    expected_cuda = pb.CudaSharedMemoryStatusResponse()
    json_format.ParseDict(cuda_dicts[0], expected_cuda.regions["g"])
    assert encode.shm_status_any_pb(cuda) == expected_cuda

    server = c.ServerMetadata("triton", "2.51.0", ["classification", "binary_tensor_data"])
    server_json = orjson.dumps(
        {"name": "triton", "version": "2.51.0", "extensions": server.extensions}
    )
    assert encode.server_metadata_json(server) == server_json
    assert encode.server_metadata_pb(server) == json_format.Parse(
        server_json, pb.ServerMetadataResponse()
    )


def test_query_reply_carries_each_record_over_the_wire() -> None:
    records: list[c.Record] = [
        c.ModelMetadata("a", ["1"], "p", [c.TensorMetadata("x", "FP32", [-1])], []),
        c.ModelConfig(b"{}", b"\x0a\x01a"),
        c.RepositoryIndex([c.IndexEntry("a", None, "UNAVAILABLE", "why")]),
        c.ShmStatus([c.ShmRegionStatus("r", "/k", 0, 1)]),
        c.CudaShmStatus([c.CudaShmRegionStatus("g", 0, 1)]),
    ]
    decode = m.decoder(m.FrontendInbound).decode
    for qid, record in enumerate(records):
        wire = m.encoder().encode(m.QueryReply(qid, record=record))
        assert decode(wire) == m.QueryReply(qid, record=record)
    with pytest.raises(Exception, match="answered ShmStatus, not ModelConfig"):
        c.expect(records[3], c.ModelConfig)
