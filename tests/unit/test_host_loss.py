"""A lost backend host, in the scheduler over its real wire (the harness of
test_scheduler.py: a ``SchedulerServer`` on a unix socket, the test plays two hosts and
a frontend): a host that stops beating is declared gone within the timeout, its stream
is cut, every frontend is told (``HostGone``), and its in-flight stateless request runs
once more on the other host, and only once; a request of a sequence is not run again
but fails with the lost-sequence error."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from test_scheduler import REPLY_TO, Peer, infer, join, run_scheduler

from despina.common import messages as m
from despina.services.scheduler.server import SchedulerServer

TIMEOUT_S = 0.5


def run(tmp_path: Path, scenario) -> None:
    run_scheduler(tmp_path, scenario, heartbeat_timeout_s=TIMEOUT_S)


async def two_hosts(endpoint: str) -> tuple[dict[str, Peer], Peer]:
    """host-1 and host-2, each with the model's instance loaded, and a frontend."""
    host1, frontend = await join(endpoint)
    host2 = await Peer(m.HostInbound).connect(endpoint)
    host2.send(m.HostHello(m.PROTOCOL_VERSION, "host-2", "onnxruntime", 4343))
    load, _ = await host2.next(m.LoadModel)
    host2.send(m.LoadResult("add", "1", load.instances))
    return {"host-1": host1, "host-2": host2}, frontend


async def executed_on(hosts: dict[str, Peer]) -> tuple[str, m.ExecuteBatch]:
    """The host that receives the next ExecuteBatch, and the batch."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for name, host in hosts.items():
            for i, (msg, _frames) in enumerate(host.got):
                if isinstance(msg, m.ExecuteBatch):
                    del host.got[i]
                    return name, msg
        await asyncio.sleep(0.01)
    raise AssertionError("no host received the request")


def test_silent_host_is_gone_and_its_request_runs_once_elsewhere(tmp_path: Path) -> None:
    data = bytes(16)

    async def scenario(server: SchedulerServer, endpoint: str) -> None:
        hosts, frontend = await two_hosts(endpoint)
        beating = set(hosts)

        async def beat() -> None:
            while True:
                for name in list(beating):
                    hosts[name].send(m.Heartbeat(name))
                await asyncio.sleep(0.05)

        beats = asyncio.create_task(beat())
        try:
            await asyncio.sleep(0.1)
            frontend.send(infer(21), data)
            silent, batch = await executed_on(hosts)
            [other] = set(hosts) - {silent}
            assert [r.rid for e in batch.executions for r in e.requests] == [21]
            beating.discard(silent)
            since = time.monotonic()

            # Sent again to the other host, once; the frontends are told; the stream cut.
            name, again = await executed_on(hosts)
            took = time.monotonic() - since
            assert name == other and [r.rid for e in again.executions for r in e.requests] == [21]
            assert TIMEOUT_S <= took < TIMEOUT_S + 2.5, took  # a loaded 2-core CI box
            gone, _ = await frontend.next(m.HostGone)
            assert gone.host_id == silent and gone.why.startswith(
                "stopped answering (no heartbeat for "
            )
            for _ in range(100):
                if hosts[silent].link.closed:  # type: ignore[union-attr]
                    break
                await asyncio.sleep(0.01)
            assert hosts[silent].link.closed  # type: ignore[union-attr]
            assert [h.host_id for h in server.hosts.values()] == [other]

            # The other host dies too: the request, sent again once already, fails.
            hosts[other].link.close()  # type: ignore[union-attr]
            replies, _ = await frontend.next(m.ReplyBatch)
            [reply] = replies.replies
            assert reply.rid == 21 and reply.error is not None
            assert reply.error.code == "UNAVAILABLE"
            assert reply.error.message == (
                "the backend host running the model (onnxruntime, pid "
                f"{4242 if other == 'host-1' else 4343}) exited while the request was in flight"
            )
        finally:
            beats.cancel()

    run(tmp_path, scenario)


def test_sequence_request_of_a_lost_host_is_not_sent_again(tmp_path: Path) -> None:
    data = bytes(16)

    async def scenario(server: SchedulerServer, endpoint: str) -> None:
        hosts, frontend = await two_hosts(endpoint)
        batch = infer(31)
        batch.requests[0].parameters = {"sequence_id": 9, "sequence_start": True}
        frontend.send(batch, data)
        lost, _ = await executed_on(hosts)
        hosts[lost].link.close()  # type: ignore[union-attr]
        replies, _ = await frontend.next(m.ReplyBatch)
        [reply] = replies.replies
        assert reply.rid == 31 and reply.error is not None
        assert reply.error.code == "UNAVAILABLE"
        pid = 4242 if lost == "host-1" else 4343
        assert reply.error.message == (
            "inference request for sequence 9 to model 'add' failed: the backend host "
            f"holding the sequence (onnxruntime, pid {pid}) exited, and the sequence's state "
            "is lost; start the sequence again with the START flag"
        )
        gone, _ = await frontend.next(m.HostGone)
        assert (gone.host_id, gone.why) == (lost, "exited")
        await asyncio.sleep(0.1)
        assert not any(isinstance(msg, m.ExecuteBatch) for h in hosts.values() for msg, _ in h.got)

    run(tmp_path, scenario)


def test_a_host_that_never_beats_is_watched_by_its_stream_alone(tmp_path: Path) -> None:
    """The Python launcher sends no heartbeat: it is not declared silent."""

    async def scenario(server: SchedulerServer, endpoint: str) -> None:
        host, frontend = await join(endpoint)
        await asyncio.sleep(3 * TIMEOUT_S)
        assert [h.host_id for h in server.hosts.values()] == ["host-1"]
        assert host.link is not None and not host.link.closed
        assert not any(isinstance(msg, m.HostGone) for msg, _ in frontend.got)
        assert REPLY_TO in server.routes.frontends

    run(tmp_path, scenario)
