"""The backend host (services/backend_host/host.py), in this process, driven over its real
wire by a fake scheduler and a fake frontend that this test plays (common/streams.py on
unix sockets): it loads a tiny ONNX model on the scheduler's order and runs a Python
model instance, answers scheduled and direct requests with the right values, reports
completions for scheduled requests only, answers a bad request and a request for an
instance it does not hold with their errors, batches direct requests of a dynamically
batched model, and answers a direct request cancelled while it waits for a batch."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from despina.common import messages as m
from despina.common import model_config, streams
from despina.services.backend_host.backend import InstanceSpec
from despina.services.backend_host.backends.onnxruntime import OnnxRuntimeBackend
from despina.services.backend_host.backends.python.backend import PythonBackend
from despina.services.backend_host.host import BackendHost

ADD_CONFIG = """
name: "add"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  { name: "A" data_type: TYPE_INT32 dims: [ 4 ] },
  { name: "B" data_type: TYPE_INT32 dims: [ 4 ] }
]
output [ { name: "SUM" data_type: TYPE_INT32 dims: [ 4 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

# Answers each request with its input doubled and the number of requests in the batch
# the host ran: the evidence that a batch formed.
PROBE = textwrap.dedent(
    """
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
                n = np.full((x.shape[0], 1), len(requests), np.int32)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("Y", x * 2), pb_utils.Tensor("N", n),
                ]))
            return responses
    """
)

PROBE_CONFIG = """
name: "probe"
backend: "python"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 60000000 preferred_batch_size: [ 3 ] }
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [
  { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] },
  { name: "N" data_type: TYPE_INT32 dims: [ 1 ] }
]
"""


def write_add_model(root: Path) -> Path:
    model_dir = root / "add"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(ADD_CONFIG)
    graph = helper.make_graph(
        [helper.make_node("Add", ["A", "B"], ["SUM"])],
        "add",
        [helper.make_tensor_value_info(n, TensorProto.INT32, [None, 4]) for n in ("A", "B")],
        [helper.make_tensor_value_info("SUM", TensorProto.INT32, [None, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, model_dir / "1" / "model.onnx")
    return model_dir


def write_probe_model(root: Path) -> Path:
    model_dir = root / "probe"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(PROBE_CONFIG)
    (model_dir / "1" / "model.py").write_text(PROBE)
    return model_dir


class FakePeers:
    """The scheduler and one frontend, as a host sees them: two listening streams. What
    the host sends lands in ``from_host`` (to the scheduler) and ``replies`` (by rid)."""

    def __init__(self, tmp_path: Path) -> None:
        self.sched_ep = f"unix://{tmp_path}/sched"
        self.reply_ep = f"unix://{tmp_path}/replies"
        self.from_host: asyncio.Queue = asyncio.Queue()
        self.replies: dict[int, tuple[m.InferReply, list]] = {}
        self.host_links: asyncio.Queue = asyncio.Queue()
        self.arrived = asyncio.Event()
        self._decode_host = m.decoder(m.SchedulerFromHost).decode
        self._decode_fe = m.decoder(m.FrontendInbound).decode
        self.encode = m.encoder().encode

    async def listen(self) -> None:
        self.sched = await streams.serve(self.sched_ep, self._on_host)
        self.frontend = await streams.serve(self.reply_ep, self._on_reply)

    def _on_host(self, link, burst) -> None:
        for frames in burst:
            self.from_host.put_nowait((link, self._decode_host(frames[0])))

    def _on_reply(self, link, burst) -> None:
        for frames in burst:
            msg = self._decode_fe(frames[0])
            if isinstance(msg, m.HostLink):
                self.host_links.put_nowait((link, msg))
            elif isinstance(msg, m.ReplyBatch):
                for reply in msg.replies:
                    self.replies[reply.rid] = (reply, frames)
                self.arrived.set()

    async def next_from_host(self, kind: type) -> tuple:
        while True:
            link, msg = await asyncio.wait_for(self.from_host.get(), 30)
            if isinstance(msg, kind):
                return link, msg

    async def wait_replies(self, rids: set[int]) -> None:
        async def until() -> None:
            while not rids <= set(self.replies):
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(until(), 30)

    def close(self) -> None:
        self.sched.close()
        self.frontend.close()


def infer(rid: int, model: str, inputs: dict[str, tuple[str, np.ndarray]], frame0: int, **kw):
    """An Infer whose inputs are inline frames from ``frame0`` on, and those frames."""
    tensors = []
    frames = []
    for i, (name, (datatype, arr)) in enumerate(inputs.items()):
        tensors.append(m.Tensor(name, datatype, list(arr.shape), m.Inline(frame0 + i)))
        frames.append(arr.tobytes())
    return m.Infer(rid, model, "1", tensors, [], {}, **kw), frames


async def onnx_host_with_add(peers: FakePeers, model_dir: Path) -> tuple:
    """An ONNX Runtime host joined to ``peers`` with the add model loaded: the host, its
    run task, the scheduler's link to it, its HostHello and the LoadResult."""
    host = BackendHost(peers.sched_ep, "onnxruntime", OnnxRuntimeBackend(), arena_threshold=1 << 20)
    running = asyncio.ensure_future(host.run())
    link, hello = await peers.next_from_host(m.HostHello)
    config = model_config.load(model_dir)
    load = m.LoadModel("add", "1", str(model_dir), config.SerializeToString(), [0])
    link.send([peers.encode(load)])
    _, loaded = await peers.next_from_host(m.LoadResult)
    return host, running, link, hello, loaded


def output(reply: tuple[m.InferReply, list], name: str, dtype) -> np.ndarray:
    record, frames = reply
    assert record.error is None, record.error
    tensor = next(t for t in record.outputs if t.name == name)
    assert isinstance(tensor.ref, m.Inline)
    return np.frombuffer(frames[tensor.ref.frame], dtype).reshape(tensor.shape)


def test_onnx_host_runs_scheduled_and_direct_requests_and_reports_only_scheduled(tmp_path):
    model_dir = write_add_model(tmp_path)
    a = np.arange(8, dtype=np.int32).reshape(2, 4)
    b = np.full((2, 4), 10, np.int32)

    async def scenario():
        peers = FakePeers(tmp_path)
        await peers.listen()
        host, running, link, hello, loaded = await onnx_host_with_add(peers, model_dir)
        try:
            # Scheduled: sid 7, through the scheduler's link.
            req, frames = infer(
                1, "add", {"A": ("INT32", a), "B": ("INT32", b)}, 1, sid=7, reply_to=peers.reply_ep
            )
            batch = m.ExecuteBatch([m.Execution("add", "1", 0, [req])])
            link.send([peers.encode(batch), *frames])
            await peers.wait_replies({1})
            _, done = await peers.next_from_host(m.Completion)

            # Direct: the frontend's request on the link the host opened to it.
            link.send([peers.encode(m.Introduce([peers.reply_ep]))])
            fe_link, host_link = await asyncio.wait_for(peers.host_links.get(), 30)
            req2, frames2 = infer(2, "add", {"A": ("INT32", a), "B": ("INT32", a)}, 1)
            req2.reply_to = peers.reply_ep
            # An error: A's bytes are too few for its shape.
            req3, frames3 = infer(3, "add", {"A": ("INT32", a[:1]), "B": ("INT32", b)}, 3)
            req3.reply_to = peers.reply_ep
            req3.inputs[0].shape = [2, 4]
            # And a request for an instance this host does not hold.
            req4, _ = infer(4, "add", {"A": ("INT32", a), "B": ("INT32", b)}, 1)
            req4.reply_to = peers.reply_ep
            direct = m.ExecuteBatch(
                [
                    m.Execution("add", "1", 0, [req2], True),
                    m.Execution("add", "1", 0, [req3], True),
                    m.Execution("add", "1", 5, [req4], True),
                ]
            )
            fe_link.send([peers.encode(direct), *frames2, *frames3])
            await peers.wait_replies({2, 3, 4})

            # A scheduled request after them: the next completion names only its sid.
            req5, frames5 = infer(
                5, "add", {"A": ("INT32", b), "B": ("INT32", b)}, 1, sid=8, reply_to=peers.reply_ep
            )
            link.send(
                [peers.encode(m.ExecuteBatch([m.Execution("add", "1", 0, [req5])])), *frames5]
            )
            await peers.wait_replies({5})
            _, done2 = await peers.next_from_host(m.Completion)
            return hello, loaded, done, host_link, done2, dict(peers.replies)
        finally:
            host.stop()
            await asyncio.wait_for(running, 30)
            peers.close()

    hello, loaded, done, host_link, done2, replies = asyncio.run(scenario())
    assert (hello.framework, hello.protocol) == ("onnxruntime", m.PROTOCOL_VERSION)
    assert (loaded.model, loaded.instances, loaded.error) == ("add", [0], "")
    np.testing.assert_array_equal(output(replies[1], "SUM", np.int32), a + b)
    assert done.done == [("add", "1", 0, [7])]
    assert host_link.host_id == hello.host_id
    np.testing.assert_array_equal(output(replies[2], "SUM", np.int32), a + a)
    assert replies[3][0].error is not None and replies[3][0].error.code == "INVALID_ARG"
    assert replies[4][0].error is not None and replies[4][0].error.code == "UNAVAILABLE"
    assert "instance 5 is not loaded" in replies[4][0].error.message
    np.testing.assert_array_equal(output(replies[5], "SUM", np.int32), b + b)
    assert done2.done == [("add", "1", 0, [8])]  # no completion for the direct requests


def test_python_instance_batches_direct_requests_and_answers_a_cancelled_one(tmp_path):
    model_dir = write_probe_model(tmp_path)
    config = model_config.load(model_dir)
    spec = InstanceSpec(
        model_name="probe",
        version="1",
        model_dir=model_dir,
        config=config,
        instance_index=0,
        kind="KIND_CPU",
        device_id=0,
    )

    def x(i: int) -> np.ndarray:
        return np.full((1, 2), i, np.float32)

    async def scenario():
        peers = FakePeers(tmp_path)
        await peers.listen()
        host = BackendHost(
            peers.sched_ep, "python", None, instance_of=("probe", "1", 0), arena_threshold=1 << 20
        )
        host.add_instance(spec, PythonBackend().load(spec))
        running = asyncio.ensure_future(host.run())
        try:
            link, _ = await peers.next_from_host(m.HostHello)
            link.send([peers.encode(m.Introduce([peers.reply_ep]))])
            fe_link, _ = await asyncio.wait_for(peers.host_links.get(), 30)

            def send(rids: list[int]) -> None:
                executions, frames = [], []
                for rid in rids:
                    req, f = infer(rid, "probe", {"X": ("FP32", x(rid))}, 1 + len(frames))
                    req.reply_to = peers.reply_ep
                    executions.append(m.Execution("probe", "1", 0, [req], True))
                    frames += f
                fe_link.send([peers.encode(m.ExecuteBatch(executions)), *frames])

            # The preferred size (3) is reached: one batch, no waiting out the 60 s delay.
            send([1, 2])
            send([3])
            await peers.wait_replies({1, 2, 3})
            # A lone request waits for the delay; its client goes away: CANCELLED.
            send([4])
            fe_link.send([peers.encode(m.Cancel(peers.reply_ep, [4]))])
            await peers.wait_replies({4})
            queued = host.executor.queued()
            return dict(peers.replies), queued
        finally:
            host.stop()
            await asyncio.wait_for(running, 30)
            peers.close()

    replies, queued = asyncio.run(scenario())
    for rid in (1, 2, 3):
        np.testing.assert_array_equal(output(replies[rid], "Y", np.float32), 2 * x(rid))
        assert output(replies[rid], "N", np.int32).tolist() == [[3]]  # ran as one batch of 3
    assert replies[4][0].error is not None and replies[4][0].error.code == "CANCELLED"
    assert queued == 0


def test_host_counts_every_execution_of_a_burst_exactly_across_its_reports(tmp_path):
    """A burst of more direct executions than one count takes (common/stats.COUNT_AT)
    is counted exactly: the reports the host sends add up to every execution, each of
    its requests and inferences once, and every execution in batch size 2's entry."""
    model_dir = write_add_model(tmp_path)
    a = np.arange(8, dtype=np.int32).reshape(2, 4)
    executions = 1500

    async def scenario():
        peers = FakePeers(tmp_path)
        await peers.listen()
        host, running, link, _, _ = await onnx_host_with_add(peers, model_dir)
        try:
            link.send([peers.encode(m.Introduce([peers.reply_ep]))])
            fe_link, _ = await asyncio.wait_for(peers.host_links.get(), 30)
            batch, frames = [], []
            for rid in range(1, executions + 1):
                req, f = infer(rid, "add", {"A": ("INT32", a), "B": ("INT32", a)}, len(frames) + 1)
                req.reply_to = peers.reply_ep
                batch.append(m.Execution("add", "1", 0, [req], True))
                frames += f
            fe_link.send([peers.encode(m.ExecuteBatch(batch)), *frames])
            await peers.wait_replies(set(range(1, executions + 1)))
            totals = {"execution_count": 0, "inference_count": 0, "infer_count": 0, "size2": 0}
            while totals["execution_count"] < executions:
                _, report = await peers.next_from_host(m.StatsReport)
                for s in report.models:
                    assert (s.name, s.version) == ("add", "1")
                    totals["execution_count"] += s.execution_count
                    totals["inference_count"] += s.inference_count
                    totals["infer_count"] += s.infer_count
                    totals["size2"] += s.batch.get(2, [0])[0]
            return totals, dict(peers.replies)
        finally:
            host.stop()
            await asyncio.wait_for(running, 30)
            peers.close()

    totals, replies = asyncio.run(scenario())
    assert all(r[0].error is None for r in replies.values())
    np.testing.assert_array_equal(output(replies[executions], "SUM", np.int32), a + a)
    assert totals == {
        "execution_count": executions,
        "inference_count": 2 * executions,  # max_batch_size > 0: the first dimension
        "infer_count": executions,
        "size2": executions,
    }
