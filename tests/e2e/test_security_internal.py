"""The internal data plane under attack or misuse (issue #12): one request that breaks in
the backend host fails alone; a client that goes away cancels its request down to the
host; TCP links with a cluster secret refuse peers that do not hold it. Real processes
throughout; each test ends with a normal inference on the same processes."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import tritonclient.http as httpclient
import uvloop

from despina.common import messages as m
from despina.common import model_config, streams

from conftest import SHIPPED_REPOSITORY, DespinaServer, free_port, http_status

CLI = [sys.executable, "-m", "despina.services.cli"]


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *args],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _identity(client: httpclient.InferenceServerClient, values: list[float]) -> np.ndarray:
    data = np.array([values], dtype=np.float32)
    inp = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return client.infer("identity_fp32", [inp]).as_numpy("OUTPUT0")


# --- 3. one bad request in a burst: the backend host answers it alone ---------------------


def _tensor(shape: list[int], frame: int) -> m.Tensor:
    return m.Tensor("INPUT0", "FP32", shape, m.Inline(frame))


def _infer(rid: int, sid: int, shape: list[int], frame: int, reply_to: str) -> m.Infer:
    return m.Infer(
        rid, "identity_fp32", "1", [_tensor(shape, frame)], ["OUTPUT0"], {}, "", sid, reply_to
    )


def test_a_request_that_breaks_in_the_host_fails_alone_and_the_burst_is_answered(tmp_path):
    """This test plays the scheduler and a frontend over the real wire to a real
    ``despina backend-host``: one ExecuteBatch mixes good requests with ones whose
    inputs the host cannot read (shape [0, 2**62] over no bytes: ValueError in numpy,
    not a ServerError; a frame index past the message), alone and inside a batch. Every
    request gets its own answer, the completions cover every sid, and the same host
    process then serves a normal request."""
    sched_ep = f"unix://{tmp_path}/sched"
    reply_ep = f"unix://{tmp_path}/replies"
    config = model_config.load(SHIPPED_REPOSITORY / "identity_fp32")
    decode_host = m.decoder(m.SchedulerFromHost).decode
    decode_fe = m.decoder(m.FrontendInbound).decode
    good = np.arange(4, dtype=np.float32).tobytes()

    async def main(proc_box: list) -> tuple[dict, list, dict]:
        loop = asyncio.get_running_loop()
        from_host: asyncio.Queue = asyncio.Queue()
        replies: dict[int, tuple[m.InferReply, list]] = {}
        got_all = loop.create_future()
        wanted: set[int] = set()

        def on_host(link, burst):
            for frames in burst:
                msg = decode_host(frames[0])
                if not isinstance(msg, m.Heartbeat):  # its liveness, not an answer
                    from_host.put_nowait((link, msg))

        def on_reply(_link, burst):
            for frames in burst:
                msg = decode_fe(frames[0])
                if isinstance(msg, m.ReplyBatch):
                    for r in msg.replies:
                        replies[r.rid] = (r, frames)
                if wanted and wanted <= set(replies) and not got_all.done():
                    got_all.set_result(None)

        sched = await streams.serve(sched_ep, on_host)
        fe = await streams.serve(reply_ep, on_reply)
        proc = _start(
            ["backend-host", "--framework", "onnxruntime", "--scheduler", sched_ep],
            tmp_path / "host.log",
        )
        proc_box.append(proc)
        link, hello = await asyncio.wait_for(from_host.get(), 60)
        assert isinstance(hello, m.HostHello)
        load = m.LoadModel(
            "identity_fp32",
            "1",
            str(SHIPPED_REPOSITORY / "identity_fp32"),
            config.SerializeToString(),
            [0],
        )
        link.send([m.encoder().encode(load)])
        _, loaded = await asyncio.wait_for(from_host.get(), 60)
        assert isinstance(loaded, m.LoadResult) and loaded.instances == [0], loaded

        # frame 1: good bytes; frame 2: nothing at all
        executions = [
            m.Execution("identity_fp32", "1", 0, [_infer(1, 11, [1, 4], 1, reply_ep)]),
            m.Execution("identity_fp32", "1", 0, [_infer(2, 12, [0, 2**62], 2, reply_ep)]),
            m.Execution("identity_fp32", "1", 0, [_infer(3, 13, [1, 4], 9, reply_ep)]),
            m.Execution(
                "identity_fp32",
                "1",
                0,
                [
                    _infer(4, 14, [1, 4], 1, reply_ep),
                    _infer(5, 15, [0, 2**62], 2, reply_ep),
                    _infer(6, 16, [1, 4], 1, reply_ep),
                ],
            ),
            m.Execution("identity_fp32", "1", 0, [_infer(7, 17, [1, 4], 1, reply_ep)]),
        ]
        wanted.update(range(1, 8))
        header = m.encoder().encode(m.ExecuteBatch(executions))
        assert link.send([header, good, b""])
        await asyncio.wait_for(got_all, 30)
        done_sids: list[int] = []
        while len(done_sids) < 7:
            _, msg = await asyncio.wait_for(from_host.get(), 10)
            if isinstance(msg, m.Completion):
                done_sids += [sid for *_, sids in msg.done for sid in sids]
        first = dict(replies)

        # The same process still serves: a normal request, answered at once.
        wanted.clear()
        replies.clear()
        got_all = loop.create_future()
        wanted.add(8)
        start = time.monotonic()
        again = m.Execution("identity_fp32", "1", 0, [_infer(8, 18, [1, 4], 1, reply_ep)])
        assert link.send([m.encoder().encode(m.ExecuteBatch([again])), good])
        await asyncio.wait_for(got_all, 10)
        elapsed = time.monotonic() - start
        link.close()
        sched.close()
        fe.close()
        return first, sorted(done_sids), {"again": replies[8], "elapsed": elapsed}

    box: list = []
    try:
        replies, done, after = uvloop.run(main(box))
        assert box[0].poll() is None, "the backend host died"
    finally:
        for proc in box:
            _stop(proc)
    log = (tmp_path / "host.log").read_text()

    def output(rid: int) -> bytes:
        reply, frames = replies[rid]
        assert reply.error is None, reply.error
        ref = reply.outputs[0].ref
        assert isinstance(ref, m.Inline)
        return bytes(frames[ref.frame])

    for rid in (1, 4, 6, 7):
        assert output(rid) == good, rid
    for rid in (2, 5):
        error = replies[rid][0].error
        assert error is not None and error.code == "INVALID_ARG", error
        assert "array is too big" in error.message, error.message
    error = replies[3][0].error
    assert error is not None and error.code == "INVALID_ARG" and "IndexError" in error.message
    assert done == [11, 12, 13, 14, 15, 16, 17], done
    reply, frames = after["again"]
    assert reply.error is None and bytes(frames[reply.outputs[0].ref.frame]) == good
    assert after["elapsed"] < 1.0  # answered at once, not after a stall
    assert "handler failed" not in log, log


# --- 7. a client that goes away cancels its request downstream --------------------------

COUNTING_PY = '''\
import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Sleeps SLEEP_MS per request and appends a line per executed request to COUNT_FILE."""

    def initialize(self, args):
        self.count_file = os.environ["DESPINA_TEST_COUNT_FILE"]

    def execute(self, requests):
        responses = []
        for request in requests:
            ms = int(pb_utils.get_input_tensor_by_name(request, "SLEEP_MS").as_numpy()[0])
            with open(self.count_file, "a") as f:
                f.write(f"{ms}\\n")
            time.sleep(ms / 1000.0)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("SLEPT_MS", np.array([ms], dtype=np.int32))]
                )
            )
        return responses
'''

COUNTING_CONFIG = """\
name: "counting"
backend: "python"
max_batch_size: 0
input [ { name: "SLEEP_MS" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "SLEPT_MS" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def _post_and_give_up(port: int, sleep_ms: int, timeout: float) -> str:
    """POST one request, wait ``timeout`` s for the answer, then close the connection."""
    body = json.dumps(
        {"inputs": [{"name": "SLEEP_MS", "datatype": "INT32", "shape": [1], "data": [sleep_ms]}]}
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v2/models/counting/infer", body)
        return str(conn.getresponse().status)
    except TimeoutError:
        return "gave up"
    finally:
        conn.close()


@pytest.mark.parametrize("direct", ["true", "false"], ids=["direct-route", "via-scheduler"])
def test_clients_that_go_away_cancel_their_queued_requests(tmp_path, direct):
    """Ten clients each ask for 400 ms of work on a one-instance model and hang up after
    300 ms. Without cancellation the host runs all ten (4 s); with it, only what had
    started when the cancels came runs. Direct route: the frontend tells the host;
    --direct-routes=false: the scheduler drops what it still queues and tells the host
    about what it sent."""
    repo = tmp_path / "repo"
    model = repo / "counting"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(COUNTING_CONFIG)
    (model / "1" / "model.py").write_text(COUNTING_PY)
    count_file = tmp_path / "count"
    os.environ["DESPINA_TEST_COUNT_FILE"] = str(count_file)
    try:
        server = DespinaServer(repo, tmp_path / "serve.log", [f"--direct-routes={direct}"])
        server.start()
    finally:
        del os.environ["DESPINA_TEST_COUNT_FILE"]
    try:
        results: list[str] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(_post_and_give_up(server.http_port, 400, 0.3))
            )
            for _ in range(10)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == ["gave up"] * 10
        time.sleep(1.5)  # what was not cancelled would still be running: let it show
        executed = count_file.read_text().split().count("400")
        assert 1 <= executed <= 3, f"{executed} of 10 abandoned requests ran"

        # A normal request on the same processes, answered at once.
        start = time.monotonic()
        assert _post_and_give_up(server.http_port, 1, 5.0) == "200"
        assert time.monotonic() - start < 1.0
    finally:
        server.stop()


# --- 10. TCP links with a cluster secret -------------------------------------------------


def _framed(*frames: bytes) -> bytes:
    return struct.pack(f"<I{len(frames)}I", len(frames), *map(len, frames)) + b"".join(frames)


@pytest.fixture()
def tcp_cell(tmp_path):
    """The scheduler, an ONNX Runtime host and a frontend as separate processes talking
    over TCP on loopback, all with DESPINA_CLUSTER_SECRET, as compose runs them."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(SHIPPED_REPOSITORY / "identity_fp32", repo / "identity_fp32")
    host_port, zmq_port, reply_port, http_port = (free_port() for _ in range(4))
    env = {"DESPINA_CLUSTER_SECRET": "cell-secret-for-tests"}
    procs = [
        _start(
            [
                "scheduler",
                f"--model-repository={repo}",
                f"--endpoint=tcp://127.0.0.1:{zmq_port}",
                f"--host-endpoint=tcp://127.0.0.1:{host_port}",
            ],
            tmp_path / "scheduler.log",
            env,
        )
    ]
    try:
        procs.append(
            _start(
                [
                    "backend-host",
                    "--framework",
                    "onnxruntime",
                    "--scheduler",
                    f"tcp://127.0.0.1:{host_port}",
                ],
                tmp_path / "host.log",
                env,
            )
        )
        procs.append(
            _start(
                [
                    "frontend",
                    f"--scheduler=tcp://127.0.0.1:{host_port}",
                    f"--reply-endpoint=tcp://127.0.0.1:{reply_port}",
                    f"--http-port={http_port}",
                    "--allow-grpc=false",
                ],
                tmp_path / "frontend.log",
                env,
            )
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for proc in procs:
                assert proc.poll() is None, (tmp_path / "frontend.log").read_text()
            try:
                if (
                    http_status(f"http://127.0.0.1:{http_port}/v2/models/identity_fp32/ready")
                    == 200
                ):
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise TimeoutError((tmp_path / "scheduler.log").read_text())
        yield {
            "host_port": host_port,
            "zmq_port": zmq_port,
            "reply_port": reply_port,
            "http_port": http_port,
            "logs": tmp_path,
        }
    finally:
        for proc in procs:
            _stop(proc)


def test_tcp_peers_without_the_cluster_secret_cannot_join(tcp_cell, monkeypatch):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{tcp_cell['http_port']}")
    assert list(_identity(client, [1.0, 2.0])[0]) == [1.0, 2.0]

    # A raw peer on the scheduler's host port: it gets a challenge, answers with a host's
    # hello instead of the secret's proof, and is disconnected.
    rogue = m.HostHello(m.PROTOCOL_VERSION, "rogue-host", "onnxruntime", 1)
    with socket.create_connection(("127.0.0.1", tcp_cell["host_port"]), timeout=5) as sock:
        challenge = sock.recv(64)
        assert challenge.startswith(b"DSPNAUTH")
        sock.sendall(_framed(msgspec.msgpack.encode(rogue)) + b"\0" * 64)
        assert sock.recv(64) == b""  # closed, nothing else said
    # The same on the frontend's reply listener, where hosts send replies.
    spoof = m.HostLink("rogue-host")
    with socket.create_connection(("127.0.0.1", tcp_cell["reply_port"]), timeout=5) as sock:
        assert sock.recv(64).startswith(b"DSPNAUTH")
        sock.sendall(_framed(msgspec.msgpack.encode(spoof)) + b"\0" * 64)
        assert sock.recv(64) == b""

    # A real stream client with another secret cannot connect at all.
    monkeypatch.setenv(streams.SECRET_ENV, "not-the-secret")

    async def connect() -> str:
        try:
            link = await streams.connect(
                f"tcp://127.0.0.1:{tcp_cell['host_port']}", lambda _l, _b: None
            )
        except ConnectionRefusedError as exc:
            return str(exc)
        link.close()
        return "connected"

    assert "authentication" in uvloop.run(connect())

    # A ZeroMQ peer without the secret gets no answer from the scheduler's ZeroMQ port.
    import zmq

    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{tcp_cell['zmq_port']}")
    dealer.send(msgspec.msgpack.encode(m.Query(1, "repository_index")))
    assert dealer.poll(1000) == 0
    dealer.close()
    ctx.term()

    # A silent unauthenticated connection holds nothing up: a request completes at once
    # (generous bound for a loaded 2-core VM; a stall would be the handshake timeout, 5 s).
    with socket.create_connection(("127.0.0.1", tcp_cell["host_port"]), timeout=5):
        start = time.monotonic()
        assert list(_identity(client, [3.0])[0]) == [3.0]
        assert time.monotonic() - start < 1.0
    client.close()

    scheduler_log = (tcp_cell["logs"] / "scheduler.log").read_text()
    frontend_log = (tcp_cell["logs"] / "frontend.log").read_text()
    assert "rogue-host" not in scheduler_log  # it never joined
    assert "does not know the cluster secret" in scheduler_log
    assert "does not know the cluster secret" in frontend_log
    assert "unauthenticated" not in scheduler_log + frontend_log


def test_tcp_links_without_a_secret_say_so_in_the_log(tmp_path):
    host_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESPINA_CLUSTER_SECRET")}
    proc = subprocess.Popen(
        [
            *CLI,
            "scheduler",
            f"--model-repository={SHIPPED_REPOSITORY}",
            "--endpoint=",
            f"--host-endpoint=tcp://127.0.0.1:{host_port}",
        ],
        stdout=open(tmp_path / "scheduler.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        log = ""
        while time.monotonic() < deadline and "unauthenticated" not in log:
            time.sleep(0.1)
            log = (tmp_path / "scheduler.log").read_text()
        assert "TCP links on tcp://127.0.0.1" in log and "DESPINA_CLUSTER_SECRET" in log, log
    finally:
        _stop(proc)
