"""Decoupled Python models (Triton's python_backend "Decoupled mode"): a model with
``model_transaction_policy { decoupled: true }`` answers each request through
``request.get_response_sender()`` with zero or more responses and then the
``TRITONSERVER_RESPONSE_COMPLETE_FINAL`` flag, from ``execute`` or from a thread after it
returned. A real ``despina serve`` (--allow-metrics=true, for ``response_stats``) serves
models this module writes; tritonclient's gRPC stream reads every response in order, the
unary gRPC and HTTP calls get Triton's refusal, the statistics extension counts every
response by its index, and a client that closes its stream mid-way makes
``sender.is_cancelled()`` true while the server keeps serving.
"""

from __future__ import annotations

import queue
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from conftest import DespinaServer

CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [ {{ name: "IN" data_type: TYPE_INT32 dims: [ -1 ] }} ]
output [
  {{ name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "IDX" data_type: TYPE_INT32 dims: [ 1 ] }}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""
# ``counted`` takes its own time-to-first-response buckets (ms), as Triton's configs may.
FIRST_RESPONSE_BUCKETS = """model_metrics {
  metric_control [ {
    metric_identifier { family: "nv_inference_first_response_histogram_ms" }
    histogram_options { buckets: [ 1, 10, 10000 ] }
  } ]
}
"""

# One response per element of IN (OUT = the element, IDX = its index), sent from a
# thread after execute returned, then the FINAL flag alone (an empty final).
REPEAT_PY = """\
import threading

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.threads = []

    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            sender = request.get_response_sender()
            thread = threading.Thread(target=self.send, args=(values.copy(), sender))
            thread.start()
            self.threads.append(thread)
        return None

    def send(self, values, sender):
        for i, value in enumerate(values):
            sender.send(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("OUT", np.array([value], dtype=np.int32)),
                        pb_utils.Tensor("IDX", np.array([i], dtype=np.int32)),
                    ]
                )
            )
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        for thread in self.threads:
            thread.join()
"""

# Every response from execute itself, the last one with the FINAL flag.
REPEAT_LAST_PY = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            sender = request.get_response_sender()
            for i, value in enumerate(values):
                flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if i == len(values) - 1 else 0
                sender.send(
                    pb_utils.InferenceResponse(
                        [
                            pb_utils.Tensor("OUT", np.array([value], dtype=np.int32)),
                            pb_utils.Tensor("IDX", np.array([i], dtype=np.int32)),
                        ]
                    ),
                    flags=flags,
                )
            try:
                sender.send(pb_utils.InferenceResponse([]))
            except pb_utils.TritonModelException as exc:
                assert "closed" in str(exc), str(exc)
            else:
                raise AssertionError("a send after the FINAL flag must raise")
        return None
"""

# Sends a response every 20 ms until its client goes away (sender.is_cancelled()), then
# writes how many it sent to MARK (a file next to the model), and ends.
ENDLESS_PY = """\
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

MARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "cancelled")


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            threading.Thread(target=self.send, args=(request, sender), daemon=True).start()
        return None

    def send(self, request, sender):
        i = 0
        deadline = time.monotonic() + 20
        while not sender.is_cancelled() and time.monotonic() < deadline:
            sender.send(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("OUT", np.array([i], dtype=np.int32)),
                        pb_utils.Tensor("IDX", np.array([i], dtype=np.int32)),
                    ]
                )
            )
            i += 1
            time.sleep(0.02)
        with open(MARK + ".tmp", "w") as f:
            f.write(f"{request.is_cancelled()} {i}")
        os.replace(MARK + ".tmp", MARK)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""

# An error response (flags 0: the stream of responses goes on), a response, the FINAL
# flag alone; or, for IN [1], execute returns a list, which a decoupled model may not.
ERRORS_PY = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        returned = None
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            if list(values) == [1]:
                returned = []
                continue
            sender = request.get_response_sender()
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("first one failed")))
            sender.send(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("OUT", np.array([9], dtype=np.int32)),
                        pb_utils.Tensor("IDX", np.array([1], dtype=np.int32)),
                    ]
                )
            )
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return returned
"""

FLOOD_TEMPLATE = """\
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

MARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "flooded")


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            threading.Thread(target=self.send, args=(sender,), daemon=True).start()
        return None

    def send(self, sender):
        tensors = TENSORS
        sent = 0
        while sent < 200 and not sender.is_cancelled():
            sender.send(pb_utils.InferenceResponse(tensors))
            sent += 1
            time.sleep(0.005)
        with open(MARK + ".tmp", "w") as f:
            f.write(f"{sender.is_cancelled()} {sent}")
        os.replace(MARK + ".tmp", MARK)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""


def flood_py(tensors: str) -> str:
    """A decoupled model that answers each request with responses of ``tensors`` (the
    Python source of a list of ``pb_utils.Tensor``, about 1 MiB) every 5 ms until it is
    cancelled (200 at most), then writes to ``flooded`` (next to the repository) whether
    it was cancelled and how many it sent."""
    return FLOOD_TEMPLATE.replace("TENSORS", tensors)


FLOOD_PY = flood_py(
    '[pb_utils.Tensor("OUT", np.zeros(1 << 18, dtype=np.int32)), '
    'pb_utils.Tensor("IDX", np.array([0], dtype=np.int32))]'
)
# Its OUT is 1 MiB: [-1] in its config.
FLOOD_CONFIG = CONFIG.replace(
    'name: "OUT" data_type: TYPE_INT32 dims: [ 1 ]',
    'name: "OUT" data_type: TYPE_INT32 dims: [ -1 ]',
)

MODELS = {
    "repeat": REPEAT_PY,
    "counted": REPEAT_PY,
    "repeat_last": REPEAT_LAST_PY,
    "endless": ENDLESS_PY,
    "errors": ERRORS_PY,
    "flood": FLOOD_PY,
}


# Both gRPC transports serve ModelStreamInfer with the same servicer: the lean HTTP/2
# one (the default) and grpc.aio.
@pytest.fixture(scope="module", params=["auto", "grpcio"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("decoupled")
    repo = root / "models"
    for name, source in MODELS.items():
        (repo / name / "1").mkdir(parents=True)
        extra = FIRST_RESPONSE_BUCKETS if name == "counted" else ""
        config = FLOOD_CONFIG if name == "flood" else CONFIG
        (repo / name / "config.pbtxt").write_text(config.format(name=name) + extra)
        (repo / name / "1" / "model.py").write_text(source)
    srv = DespinaServer(
        repo,
        root / "server.log",
        ["--allow-metrics=true", "--metrics-config=histogram_latencies=true"],
        env={"DESPINA_GRPC_TRANSPORT": request.param},
    ).start()
    yield srv
    srv.stop()


def _inputs(values: list[int]) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("IN", [len(values)], "INT32")
    tensor.set_data_from_numpy(np.array(values, dtype=np.int32))
    return [tensor]


class _Stream:
    """A tritonclient gRPC stream (sync ``start_stream`` with a callback) whose
    responses are read from a queue, with deadlines."""

    def __init__(self, server: DespinaServer) -> None:
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def take(self, count: int, timeout: float = 10.0) -> list:
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got.append(self.responses.get(timeout=max(0.01, deadline - time.monotonic())))
        return got

    def quiet(self, seconds: float = 0.3) -> bool:
        """Nothing more arrives within ``seconds``."""
        try:
            self.responses.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def _values(result) -> tuple[int, int]:
    return int(result.as_numpy("OUT")[0]), int(result.as_numpy("IDX")[0])


def _final(result) -> bool | None:
    params = result.get_response().parameters
    return params["triton_final_response"].bool_param if "triton_final_response" in params else None


def test_stream_gets_every_response_in_order(server: DespinaServer) -> None:
    stream = _Stream(server)
    try:
        values = [10, 20, 30, 40, 50]
        stream.client.async_stream_infer("repeat", _inputs(values), request_id="r1")
        got = stream.take(len(values))
        assert [e for _, e in got] == [None] * len(values)
        assert [_values(r) for r, _ in got] == [(v, i) for i, v in enumerate(values)]
        assert {r.get_response().id for r, _ in got} == {"r1"}
        assert [_final(r) for r, _ in got] == [None] * len(values)
        assert stream.quiet()  # the empty final is not written without the flag

        # With triton_enable_empty_final_response: false until the empty final, true.
        stream.client.async_stream_infer(
            "repeat", _inputs([7, 8]), request_id="r2", enable_empty_final_response=True
        )
        got = stream.take(3)
        assert [e for _, e in got] == [None] * 3
        assert [_values(r) for r, _ in got[:2]] == [(7, 0), (8, 1)]
        assert [_final(r) for r, _ in got] == [False, False, True]
        last = got[2][0].get_response()
        assert (last.id, last.model_name, list(last.outputs)) == ("r2", "repeat", [])

        # Zero responses: the empty final alone.
        stream.client.async_stream_infer(
            "repeat", _inputs([]), request_id="r3", enable_empty_final_response=True
        )
        (only,) = stream.take(1)
        assert only[1] is None and only[0].get_response().id == "r3" and _final(only[0]) is True
    finally:
        stream.close()


def test_final_flag_with_a_response_sent_from_execute(server: DespinaServer) -> None:
    stream = _Stream(server)
    try:
        stream.client.async_stream_infer(
            "repeat_last", _inputs([5, 6, 7]), request_id="a", enable_empty_final_response=True
        )
        got = stream.take(3)
        assert [e for _, e in got] == [None] * 3
        assert [_values(r) for r, _ in got] == [(5, 0), (6, 1), (7, 2)]
        assert [_final(r) for r, _ in got] == [False, False, True]
        assert stream.quiet()
        # Several requests on one stream: each one's responses in order.
        for k in range(4):
            stream.client.async_stream_infer(
                "repeat_last", _inputs([k, k + 100]), request_id=f"m{k}"
            )
        got = stream.take(8)
        assert [e for _, e in got] == [None] * 8
        by_id: dict[str, list] = {}
        for result, _ in got:
            by_id.setdefault(result.get_response().id, []).append(_values(result))
        assert by_id == {f"m{k}": [(k, 0), (k + 100, 1)] for k in range(4)}
    finally:
        stream.close()


def test_unary_calls_are_refused(server: DespinaServer) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer("repeat", _inputs([1, 2]))
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    assert info.value.message() == (
        "ModelInfer RPC doesn't support models with decoupled transaction policy"
    )
    tensor = httpclient.InferInput("IN", [2], "INT32")
    tensor.set_data_from_numpy(np.array([1, 2], dtype=np.int32))
    with httpclient.InferenceServerClient(server.url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer("repeat", [tensor])
    assert info.value.status() == "501"
    assert info.value.message() == (
        "HTTP end point doesn't support models with decoupled transaction policy"
    )


def test_a_client_that_does_not_read_gets_its_stream_ended(server: DespinaServer) -> None:
    """A decoupled model's responses wait for a stream's client that does not read them
    (a raw HTTP/2 client that never opens its window) up to 16 MiB; past it the stream's
    requests are cancelled (the model sees it), instead of the frontend holding them."""
    from test_h2_conformance import DATA, RawH2, frame, grpc_message, request_fields

    mark = server.repository / "flooded"
    mark.unlink(missing_ok=True)
    request = grpcclient.service_pb2.ModelInferRequest(model_name="flood", id="flood")
    tensor = request.inputs.add(name="IN", datatype="INT32")
    tensor.shape.append(1)
    request.raw_input_contents.append(np.array([0], dtype=np.int32).tobytes())
    port = int(server.grpc_url.rsplit(":", 1)[1])
    with RawH2(port) as client:
        path = "/inference.GRPCInferenceService/ModelStreamInfer"
        client.send(
            client.headers(1, request_fields(path)),
            frame(DATA, 0, 1, grpc_message(request.SerializeToString())),  # stream stays open
        )
        deadline = time.monotonic() + 20
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # never a WINDOW_UPDATE: 64 KiB is all the server may send
        cancelled, sent = mark.read_text().split()
    assert cancelled == "True" and int(sent) < 100, (cancelled, sent)


def test_a_closed_stream_cancels_the_sender(server: DespinaServer) -> None:
    mark = server.repository / "cancelled"
    mark.unlink(missing_ok=True)
    stream = _Stream(server)
    stream.client.async_stream_infer("endless", _inputs([0]), request_id="e")
    got = stream.take(3)
    assert [_values(r) for r, _ in got] == [(0, 0), (1, 1), (2, 2)]
    stream.client.stop_stream(cancel_requests=True)  # RST_STREAM mid-way
    stream.client.close()
    deadline = time.monotonic() + 10
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    seen, sent = mark.read_text().split()
    assert seen == "True"  # request.is_cancelled() too
    assert 3 <= int(sent) < 200
    # The server goes on serving, the same model and another.
    stream = _Stream(server)
    try:
        stream.client.async_stream_infer("repeat_last", _inputs([1, 2]), request_id="after")
        assert [_values(r) for r, _ in stream.take(2)] == [(1, 0), (2, 1)]
        mark.unlink()
        stream.client.async_stream_infer("endless", _inputs([0]), request_id="again")
        assert [_values(r) for r, _ in stream.take(2)] == [(0, 0), (1, 1)]
    finally:
        stream.client.stop_stream(cancel_requests=True)
        stream.client.close()
    deadline = time.monotonic() + 10
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mark.read_text().split()[0] == "True"
    # Each cancelled request's end is counted as a cancel (response_stats), once.
    with httpclient.InferenceServerClient(server.url) as client:
        deadline = time.monotonic() + 5
        while True:
            stats = _response_stats(client.get_inference_statistics("endless"), "endless")
            cancels = sum(entry["cancel"]["count"] for entry in stats.values())
            if cancels >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert cancels == 2
    assert stats["0"]["success"]["count"] == 2  # both streams read their first response


def _response_stats(stats: dict, model: str) -> dict:
    (entry,) = [s for s in stats["model_stats"] if s["name"] == model]
    return entry["response_stats"]


def test_response_stats_count_every_response_by_index(server: DespinaServer) -> None:
    # A model of its own, so the counts are this test's: four requests of 3, 1, 0 and 2
    # responses, each then its empty final (at the index after its last response).
    # Before any, its time-to-first-response histogram is there, empty (as in Triton).
    before = _first_response_histogram(server, "counted")
    assert before[("count", None)] == 0 and before[("bucket", "+Inf")] == 0
    stream = _Stream(server)
    try:
        for values in ([1, 2, 3], [4], [], [5, 6]):
            stream.client.async_stream_infer("counted", _inputs(values))
        got = stream.take(6)
        assert [e for _, e in got] == [None] * 6
        assert stream.quiet()
    finally:
        stream.close()
    expected = {
        "0": (3, 1),  # success count, empty_response count
        "1": (2, 1),
        "2": (1, 1),
        "3": (0, 1),
    }
    with httpclient.InferenceServerClient(server.url) as client:
        deadline = time.monotonic() + 5
        while True:  # the frontend's counts reach the scheduler within 0.1 s
            http_stats = _response_stats(client.get_inference_statistics("counted"), "counted")
            seen = {
                k: (v["success"]["count"], v["empty_response"]["count"])
                for k, v in http_stats.items()
            }
            if seen == expected or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert seen == expected
    for index, entry in http_stats.items():
        assert entry["fail"] == {"count": 0, "ns": 0}
        assert entry["cancel"] == {"count": 0, "ns": 0}
        assert entry["compute_infer"]["count"] == entry["success"]["count"]
        assert (entry["success"]["ns"] > 0) == (entry["success"]["count"] > 0), index
        assert (entry["empty_response"]["ns"] > 0) == (entry["empty_response"]["count"] > 0)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        grpc_stats = client.get_inference_statistics("counted", as_json=True)
    assert {
        k: (int(v["success"].get("count", 0)), int(v["empty_response"].get("count", 0)))
        for k, v in _response_stats(grpc_stats, "counted").items()
    } == expected
    with httpclient.InferenceServerClient(server.url) as client:
        (entry,) = client.get_inference_statistics("counted")["model_stats"]
    assert entry["inference_stats"]["success"]["count"] == 4  # requests, as ever
    # Triton's time-to-first-response histogram (--metrics-config histogram_latencies):
    # one observation per request, its first response or its empty final, in ms.
    # On the model's own buckets (its config's model_metrics), binned by the scheduler.
    first = _first_response_histogram(server, "counted")
    assert first[("count", None)] == 4 and first[("bucket", "+Inf")] == 4
    assert set(le for kind, le in first if kind == "bucket") == {"1", "10", "10000", "+Inf"}
    assert first[("bucket", "10000")] == 4  # each well under 10 s
    assert first[("bucket", "1")] <= first[("bucket", "10")] <= 4
    assert 0 < first[("sum", None)] < 4 * 10_000


def _first_response_histogram(server: DespinaServer, model: str) -> dict:
    """``model``'s nv_inference_first_response_histogram_ms samples in /metrics, by
    (bucket/count/sum, le)."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    (family,) = [
        f
        for f in text_string_to_metric_families(text)
        if f.name == "nv_inference_first_response_histogram_ms"
    ]
    return {
        (s.name.rsplit("_", 1)[-1], s.labels.get("le")): s.value
        for s in family.samples
        if s.labels["model"] == model
    }


def test_error_responses_and_a_wrong_return(server: DespinaServer) -> None:
    stream = _Stream(server)
    try:
        stream.client.async_stream_infer("errors", _inputs([0]), request_id="x")
        (first, second) = stream.take(2)
        assert first[0] is None and first[1].message() == "first one failed"
        assert second[1] is None and _values(second[0]) == (9, 1)
        assert stream.quiet()
        stream.client.async_stream_infer("errors", _inputs([1]), request_id="y")
        ((result, error),) = stream.take(1)
        assert result is None
        assert error.message() == (
            "Failed to process the request(s) for model instance 'errors_0_0', message: "
            "Python model 'errors_0_0' is using the decoupled mode and the execute function "
            "must return None."
        )
        # The stream stays usable.
        stream.client.async_stream_infer("errors", _inputs([0]), request_id="z")
        assert [e is None for _, e in stream.take(2)] == [False, True]
    finally:
        stream.close()
