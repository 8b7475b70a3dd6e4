"""The frontend's scheduler client (services/frontend/scheduler_client.py, with call.py,
placement.py, routes.py and scheduler_link.py), real, on a real event loop in this
process, against a fake scheduler (a ``streams.serve`` listener on a unix socket) and a
fake backend host (a ``streams.connect`` link to the client's reply listener) that this
test plays, both decoding every message the client sends and answering with real ones.
Checked: the hello; a request through the scheduler, its bytes inline and its reply's
bytes in the result; a large input as a ref into the client's arena, its block freed by
the reply or the error; a direct route sending the next request to the host, checked
against the route's signature first; cancels to whoever holds the request, the late
reply freeing the blocks; a host link that closes failing its direct calls; an output
lease given back with ``Release``; queries answered with typed records and errors; the
statistics report."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import pytest
import uvloop

from despina.common import control as c
from despina.common import messages as m
from despina.common import streams
from despina.common.errors import Code, ServerError
from despina.common.settings import FrontendSettings
from despina.common.shm.arena import ShmArena, ShmMapper, arena_prefix
from despina.services.frontend.__main__ import add_arguments
from despina.services.frontend.call import InferCall
from despina.services.frontend.inference import InferenceRequest, InputTensor, OutputRequest
from despina.services.frontend.scheduler_client import SchedulerClient

THRESHOLD = 4096  # --inline-threshold: inputs of at least this many bytes travel in shm
SMALL = bytes(range(16))  # FP32 [1, 4]: inline
LARGE = bytes(i % 251 for i in range(THRESHOLD))  # FP32 [1, 1024]: through the arena
OUT = bytes(range(100, 116))
SIGNATURE = m.Signature("add", 8, {"INPUT0": ("FP32", [-1])}, ["INPUT0"], ["OUTPUT0"])
ROUTES = m.Routes([m.Route("add", "1", True, SIGNATURE, [("host-1", 0)])])


class Inbox:
    """One end of a real stream to the client: what it received, decoded, with all of
    each message's frames (an ``Inline(n)`` ref is ``frames[n]``)."""

    def __init__(self, kind: object) -> None:
        self.decode = m.decoder(kind).decode
        self.got: list[tuple[msgspec.Struct, list]] = []
        self.arrived = asyncio.Event()
        self.link: streams.FramedProtocol | None = None

    def on_burst(self, link: streams.FramedProtocol, burst: list[list]) -> None:
        self.link = link
        for frames in burst:
            self.got.append((self.decode(frames[0]), frames))
        self.arrived.set()

    def made(self, link: streams.FramedProtocol) -> None:
        self.link = link

    def send(self, msg: msgspec.Struct, *frames: bytes) -> None:
        assert self.link is not None
        assert self.link.send([m.encoder().encode(msg), *frames])

    def kinds(self) -> list[str]:
        return [type(msg).__name__ for msg, _ in self.got]

    async def next(self, kind: type, timeout: float = 2.0) -> tuple:
        """The first message of ``kind`` not taken yet, and its frames."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, (msg, frames) in enumerate(self.got):
                if isinstance(msg, kind):
                    del self.got[i]
                    return msg, frames
            self.arrived.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__} came; got {self.kinds()}")
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except asyncio.TimeoutError:
                pass


async def until(done: Callable[[], bool], what: str, timeout: float = 2.0) -> None:
    """Yield to the loop until ``done()`` (what the client does with a message it was
    sent shows only in its state)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0)


def request(data: bytes, datatype: str = "FP32", rid: str = "req") -> InferenceRequest:
    tensor = InputTensor("INPUT0", datatype, [1, len(data) // 4], data)
    return InferenceRequest("add", "", rid, [tensor], [OutputRequest("OUTPUT0")])


def reply(rid: int, ref: m.TensorRef) -> m.ReplyBatch:
    return m.ReplyBatch([m.InferReply(rid, "add", "1", [m.Tensor("OUTPUT0", "FP32", [1, 4], ref)])])


def failed(rid: int, code: str, message: str) -> m.ReplyBatch:
    return m.ReplyBatch([m.InferReply(rid, "add", "1", [], m.Error(code, message))])


Scenario = Callable[[SchedulerClient, Inbox, str], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, statistics: bool = False) -> None:
    """A fake scheduler listening on a unix socket under ``tmp_path`` and a client built
    from the frontend's own flags and settings, as services/frontend/__main__.py builds
    it, started; then ``scenario(client, scheduler, reply_endpoint)``, then both closed."""
    scheduler_endpoint = f"unix://{tmp_path}/sched.sock"
    reply_endpoint = f"unix://{tmp_path}/replies.sock"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            f"--scheduler={scheduler_endpoint}",
            f"--reply-endpoint={reply_endpoint}",
            f"--inline-threshold={THRESHOLD}",
        ]
    )
    settings = FrontendSettings.from_args(args, {})

    async def main() -> None:
        scheduler = Inbox(m.SchedulerFromFrontend)
        server = await streams.serve(scheduler_endpoint, scheduler.on_burst, None, scheduler.made)
        client = SchedulerClient(
            args.scheduler,
            args.reply_endpoint,
            inline_threshold=args.inline_threshold,
            speed=settings.speed,
        )
        if statistics:
            client.count_statistics()
        await client.start()
        try:
            await asyncio.wait_for(scenario(client, scheduler, reply_endpoint), 4)
        finally:
            client.close()
            if scheduler.link is not None:
                scheduler.link.close()
            server.close()

    uvloop.run(main())


async def host_link(reply_endpoint: str, client: SchedulerClient, host_id: str = "host-1") -> Inbox:
    """A fake backend host: its link to the client's reply listener, announced with
    ``HostLink``, once the client has taken it as that host's; and the routes naming it."""
    host = Inbox(m.HostFromFrontend)
    host.link = await streams.connect(reply_endpoint, host.on_burst)
    host.send(m.HostLink(host_id))
    await until(lambda: host_id in client._host_links, "the client to take the HostLink")
    return host


async def direct_routes(client: SchedulerClient, scheduler: Inbox) -> None:
    scheduler.send(ROUTES)
    await until(lambda: ("add", "") in client.routes.table, "the client to take the routes")


def test_hello_then_infer_through_the_scheduler(tmp_path: Path) -> None:
    async def scenario(client: SchedulerClient, scheduler: Inbox, reply_endpoint: str) -> None:
        hello, _ = await scheduler.next(m.FrontendHello)
        assert hello == m.FrontendHello(m.PROTOCOL_VERSION, reply_endpoint)

        call = client.send(client.call(), request(SMALL, rid="r-1"))
        assert isinstance(call, InferCall) and call.rid > 0 and client.inflight == 1
        batch, frames = await scheduler.next(m.InferBatch)
        assert batch.reply_to == reply_endpoint
        [wire] = batch.requests
        assert (wire.rid, wire.model, wire.version, wire.request_id) == (call.rid, "add", "", "r-1")
        assert (wire.outputs, wire.reply_to, wire.sid) == (["OUTPUT0"], "", 0)
        [tensor] = wire.inputs
        assert (tensor.name, tensor.datatype, tensor.shape) == ("INPUT0", "FP32", [1, 4])
        assert isinstance(tensor.ref, m.Inline) and bytes(frames[tensor.ref.frame]) == SMALL
        assert client.arena.blocks_in_use == 0  # small: nothing in shared memory

        scheduler.send(reply(call.rid, m.Inline(1)), OUT)
        result = await asyncio.wait_for(call, 2)
        assert (result.model, result.version, result.id) == ("add", "1", "r-1")
        [out] = result.outputs
        assert (out.name, out.datatype, out.shape, bytes(out.data)) == (
            "OUTPUT0",
            "FP32",
            [1, 4],
            OUT,
        )
        call.close()
        assert client.inflight == 0

    run(tmp_path, scenario)


def test_large_input_is_an_arena_ref_freed_by_the_reply_or_the_error(tmp_path: Path) -> None:
    async def scenario(client: SchedulerClient, scheduler: Inbox, reply_endpoint: str) -> None:
        reader = ShmMapper()
        for answer in ("reply", "error"):
            call = client.send(client.call(), request(LARGE))
            batch, frames = await scheduler.next(m.InferBatch)
            [tensor] = batch.requests[0].inputs
            assert isinstance(tensor.ref, m.Shm) and len(frames) == 1  # no inline frame
            assert tensor.ref.key.startswith(client.arena.prefix)
            assert tensor.ref.size == THRESHOLD
            assert bytes(reader.view(tensor.ref.key, tensor.ref.offset, THRESHOLD)) == LARGE
            assert client.arena.blocks_in_use == 1  # until the holder is done reading it
            if answer == "reply":
                scheduler.send(reply(call.rid, m.Inline(1)), OUT)
                result = await asyncio.wait_for(call, 2)
                assert bytes(result.outputs[0].data) == OUT
            else:
                scheduler.send(failed(call.rid, "INTERNAL", "the model broke"))
                with pytest.raises(ServerError) as info:
                    await asyncio.wait_for(call, 2)
                assert (info.value.code, info.value.message) == (Code.INTERNAL, "the model broke")
            assert client.arena.blocks_in_use == 0
            call.close()

    run(tmp_path, scenario)


def test_direct_route_sends_to_the_host_after_checking_the_signature(tmp_path: Path) -> None:
    async def scenario(client: SchedulerClient, scheduler: Inbox, reply_endpoint: str) -> None:
        host = await host_link(reply_endpoint, client)
        await direct_routes(client, scheduler)

        # A wrong datatype is refused here, at once, and nothing is sent anywhere.
        refused = client.call()
        with pytest.raises(ServerError) as info:
            client.send(refused, request(SMALL, "INT32"))
        assert info.value.code is Code.INVALID_ARG
        assert info.value.message == (
            "inference input 'INPUT0' data-type is 'INT32', but model 'add' expects 'FP32'"
        )
        assert client.inflight == 0 and refused.rid == 0
        refused.close()

        call = client.send(client.call(), request(SMALL, rid="d-1"))
        batch, frames = await host.next(m.ExecuteBatch)
        [execution] = batch.executions  # only this request: the refused one never left
        assert (execution.model, execution.version, execution.instance) == ("add", "1", 0)
        assert execution.direct is True
        [wire] = execution.requests
        assert (wire.rid, wire.version, wire.reply_to, wire.request_id) == (
            call.rid,
            "1",
            reply_endpoint,
            "d-1",
        )
        [tensor] = wire.inputs
        assert isinstance(tensor.ref, m.Inline) and bytes(frames[tensor.ref.frame]) == SMALL
        [target] = client.routes.table[("add", "1")][1]
        assert (target.host_id, target.outstanding) == ("host-1", 1)

        host.send(reply(call.rid, m.Inline(1)), OUT)
        result = await asyncio.wait_for(call, 2)
        assert (result.version, bytes(result.outputs[0].data)) == ("1", OUT)
        assert target.outstanding == 0
        call.close()
        # The scheduler saw the hello and the routes' request path was never it.
        assert scheduler.kinds() == ["FrontendHello"] and host.got == []

    run(tmp_path, scenario)


def test_cancel_goes_to_the_holder_and_the_late_reply_frees_the_blocks(tmp_path: Path) -> None:
    async def scenario(client: SchedulerClient, scheduler: Inbox, reply_endpoint: str) -> None:
        # Through the scheduler.
        call = client.send(client.call(), request(LARGE))
        batch, _ = await scheduler.next(m.InferBatch)
        assert batch.requests[0].rid == call.rid
        call.cancel()
        cancel, _ = await scheduler.next(m.Cancel)
        assert cancel == m.Cancel(reply_endpoint, [call.rid])
        assert client.arena.blocks_in_use == 1 and client.inflight == 1  # still being read
        scheduler.send(failed(call.rid, "CANCELLED", "cancelled"))
        await until(lambda: client.inflight == 0, "the late reply")
        assert client.arena.blocks_in_use == 0
        call.close()

        # Straight to a backend host: the cancel goes on its link, not to the scheduler.
        host = await host_link(reply_endpoint, client)
        await direct_routes(client, scheduler)
        call = client.send(client.call(), request(LARGE))
        batch, _ = await host.next(m.ExecuteBatch)
        [wire] = batch.executions[0].requests
        assert wire.rid == call.rid and isinstance(wire.inputs[0].ref, m.Shm)
        call.cancel()
        cancel, _ = await host.next(m.Cancel)
        assert cancel == m.Cancel(reply_endpoint, [call.rid])
        assert client.arena.blocks_in_use == 1
        host.send(failed(call.rid, "CANCELLED", "cancelled"))
        await until(lambda: client.inflight == 0, "the late reply")
        assert client.arena.blocks_in_use == 0
        assert client.routes.table[("add", "1")][1][0].outstanding == 0
        call.close()
        assert [k for k in scheduler.kinds() if k != "FrontendHello"] == []

    run(tmp_path, scenario)


def test_host_link_closing_fails_its_direct_calls(tmp_path: Path) -> None:
    async def scenario(client: SchedulerClient, scheduler: Inbox, reply_endpoint: str) -> None:
        host = await host_link(reply_endpoint, client)
        await direct_routes(client, scheduler)
        call = client.send(client.call(), request(LARGE))
        await host.next(m.ExecuteBatch)
        assert host.link is not None
        host.link.close()
        with pytest.raises(ServerError) as info:
            await asyncio.wait_for(call, 2)
        assert info.value.code is Code.UNAVAILABLE
        assert info.value.message == (
            "the backend host running the model (host-1) exited while the request was in flight"
        )
        assert client.arena.blocks_in_use == 0 and client.inflight == 0
        assert "host-1" not in client._host_links
        call.close()

        # With no link to the route's host, the next request goes through the scheduler.
        again = client.send(client.call(), request(SMALL))
        batch, _ = await scheduler.next(m.InferBatch)
        assert batch.requests[0].rid == again.rid and batch.requests[0].version == ""
        scheduler.send(reply(again.rid, m.Inline(1)), OUT)
        assert bytes((await asyncio.wait_for(again, 2)).outputs[0].data) == OUT
        again.close()

    run(tmp_path, scenario)


def test_output_lease_is_released_when_the_call_closes(tmp_path: Path) -> None:
    async def scenario(client: SchedulerClient, scheduler: Inbox, reply_endpoint: str) -> None:
        host = await host_link(reply_endpoint, client)
        await direct_routes(client, scheduler)
        host_arena = ShmArena(arena_prefix("bh"), 1024 * 1024)  # the host's output arena
        try:
            key, offset, view = host_arena.allocate(len(OUT))
            view[: len(OUT)] = OUT
            call = client.send(client.call(), request(SMALL))
            await host.next(m.ExecuteBatch)
            host.send(reply(call.rid, m.Shm(key, offset, len(OUT))))
            result = await asyncio.wait_for(call, 2)
            [out] = result.outputs
            assert isinstance(out.data, memoryview) and bytes(out.data) == OUT  # read in place
            assert len(call.leases) == 1 and host.got == []  # held until the call closes
            call.close()
            release, _ = await host.next(m.Release)
            assert release.blocks == [(key, offset)]
            assert call.leases == []
            call.close()  # idempotent: nothing is released twice
            # The link is ordered and a Release is flushed before requests: once the
            # next request arrives, a second Release would have come before it.
            after = client.send(client.call(), request(SMALL))
            batch, _ = await host.next(m.ExecuteBatch)
            assert batch.executions[0].requests[0].rid == after.rid
            assert host.got == []
            host.send(reply(after.rid, m.Inline(1)), OUT)
            await asyncio.wait_for(after, 2)
            after.close()
        finally:
            host_arena.close()

    run(tmp_path, scenario)


def test_queries_answer_typed_records_and_errors(tmp_path: Path) -> None:
    meta = c.ModelMetadata(
        "add", ["1"], "onnxruntime_onnx", [c.TensorMetadata("INPUT0", "FP32", [-1, 4])], []
    )

    async def scenario(client: SchedulerClient, scheduler: Inbox, reply_endpoint: str) -> None:
        asked = asyncio.ensure_future(client.query("model_metadata", "add", "1"))
        query, _ = await scheduler.next(m.Query)
        assert (query.kind, query.model, query.version, query.body) == (
            "model_metadata",
            "add",
            "1",
            b"",
        )
        scheduler.send(m.QueryReply(query.qid, record=meta))
        assert await asyncio.wait_for(asked, 2) == meta

        asked = asyncio.ensure_future(client.query("model_ready", "nope"))
        query, _ = await scheduler.next(m.Query)
        message = "Request for unknown model: 'nope' is not found"
        scheduler.send(m.QueryReply(query.qid, error=m.Error("NOT_FOUND", message)))
        with pytest.raises(ServerError) as info:
            await asyncio.wait_for(asked, 2)
        assert (info.value.code, info.value.message) == (Code.NOT_FOUND, message)

        asked = asyncio.ensure_future(client.query("server_ready"))
        query, _ = await scheduler.next(m.Query)
        scheduler.send(m.QueryReply(query.qid))
        assert await asyncio.wait_for(asked, 2) is None

        with pytest.raises(ServerError) as info:
            await client.query("repository_index", timeout=0.05)  # the scheduler never answers
        assert (info.value.code, info.value.message) == (
            Code.UNAVAILABLE,
            "the scheduler did not answer in time",
        )

    run(tmp_path, scenario)


def test_statistics_reach_the_scheduler(tmp_path: Path) -> None:
    async def scenario(client: SchedulerClient, scheduler: Inbox, reply_endpoint: str) -> None:
        ok = client.send(client.call(), request(SMALL))
        refused = client.send(client.call(), request(SMALL))
        batch, _ = await scheduler.next(m.InferBatch)
        rids = [w.rid for w in batch.requests]
        while len(rids) < 2:  # light load sends each at once: maybe two batches
            more, _ = await scheduler.next(m.InferBatch)
            rids += [w.rid for w in more.requests]
        assert rids == [ok.rid, refused.rid]
        scheduler.send(reply(ok.rid, m.Inline(1)), OUT)
        scheduler.send(failed(refused.rid, "NOT_FOUND", "no such model"))
        await asyncio.wait_for(ok, 2)
        with pytest.raises(ServerError):
            await asyncio.wait_for(refused, 2)
        ok.close()
        refused.close()
        report, _ = await scheduler.next(m.StatsReport)
        # The success under the version that ran it; the refusal (the scheduler's
        # reply, no host's) as REJECTED under the version the request named.
        stats = {(s.name, s.version): s for s in report.models}
        assert sorted(stats) == [("add", ""), ("add", "1")]
        ran, named = stats[("add", "1")], stats[("add", "")]
        assert (ran.success_count, ran.fail) == (1, {})
        assert ran.success_ns > 0
        assert named.success_count == 0 and list(named.fail) == ["REJECTED"]
        assert named.fail["REJECTED"][0] == 1 and named.fail["REJECTED"][1] > 0

    run(tmp_path, scenario, statistics=True)
