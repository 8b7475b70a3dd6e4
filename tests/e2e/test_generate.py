"""Triton's generate extension end to end, on both HTTP transports (lean and aiohttp):
``/generate`` maps the request's fields to the model's inputs and parameters and answers
its one response as ``{"model_name", "model_version", <output>: value}``;
``/generate_stream`` writes a decoupled model's responses as Server-Sent Events as they
come, an error after the first as an ``{"error"}`` event; refusals before inference are
HTTP errors with Triton's JSON body."""

from __future__ import annotations

import http.client
import socket
import time

import orjson
import pytest
from test_decoupled import flood_py

from conftest import DespinaServer

CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: {batch}
{policy}
input [ {{ name: "text_input" data_type: TYPE_STRING dims: [ -1 ] }} ]
output [ {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

# The text upper-cased, with the request's "suffix" parameter after it.
SHOUT_PY = """\
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            texts = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
            suffix = json.loads(request.parameters()).get("suffix", "")
            out = [t.decode().upper() + suffix for t in texts.reshape(-1)]
            shape = texts.shape
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("text_output", np.array(out, dtype=np.object_).reshape(shape))
            ]))
        return responses
"""

# Decoupled: one response per word of the text, then the FINAL flag alone; the word
# "boom" is answered with an error response instead.
WORDS_PY = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
            sender = request.get_response_sender()
            for word in text.reshape(-1)[0].decode().split():
                if word == "boom":
                    sender.send(pb_utils.InferenceResponse(
                        error=pb_utils.TritonError("the model hit a boom")))
                    continue
                sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("text_output", np.array([word], dtype=np.object_))
                ]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""

FLOOD_PY = flood_py(
    '[pb_utils.Tensor("text_output", np.array(["x" * (1 << 20)], dtype=np.object_))]'
)

DECOUPLED = "model_transaction_policy { decoupled: true }"
MODELS = {
    "shout": (SHOUT_PY, 0, ""),
    "shout_batched": (SHOUT_PY, 4, ""),
    "words": (WORDS_PY, 0, DECOUPLED),
    "flood": (FLOOD_PY, 0, DECOUPLED),
}


@pytest.fixture(scope="module", params=["lean", "aiohttp"])
def server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    repo = root / "models"
    for name, (source, batch, policy) in MODELS.items():
        (repo / name / "1").mkdir(parents=True)
        config = CONFIG.format(name=name, batch=batch, policy=policy)
        (repo / name / "config.pbtxt").write_text(config)
        (repo / name / "1" / "model.py").write_text(source)
    srv = DespinaServer(
        repo, root / "server.log", env={"DESPINA_HTTP_TRANSPORT": request.param}
    ).start()
    srv.repository = repo  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def post(server: DespinaServer, path: str, body: bytes) -> tuple[int, dict, bytes]:
    host, port = server.url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        conn.close()


def events(body: bytes) -> list[dict]:
    """The Server-Sent Events of a body: each ``data:`` line's JSON."""
    chunks = [c for c in body.decode().split("\n\n") if c]
    assert all(c.startswith("data: ") for c in chunks), body
    return [orjson.loads(c[len("data: ") :]) for c in chunks]


def test_generate_maps_fields_to_inputs_and_parameters(server):
    status, headers, body = post(
        server,
        "/v2/models/shout/generate",
        orjson.dumps({"text_input": "hello", "parameters": {"suffix": "!"}}),
    )
    assert status == 200 and headers["content-type"] == "application/json"
    assert orjson.loads(body) == {
        "model_name": "shout",
        "model_version": "1",
        "text_output": "HELLO!",
    }
    # A field that names no input is a parameter too; a list is a 1-D input; a model
    # that batches gets a batch dimension of 1; a version may be named.
    status, _, body = post(
        server,
        "/v2/models/shout_batched/versions/1/generate",
        orjson.dumps({"text_input": ["a", "b"], "suffix": "?"}),
    )
    assert status == 200, body
    assert orjson.loads(body) == {
        "model_name": "shout_batched",
        "model_version": "1",
        "text_output": ["A?", "B?"],
    }


def test_generate_stream_writes_each_response_as_an_event(server):
    status, headers, body = post(
        server, "/v2/models/words/generate_stream", orjson.dumps({"text_input": "one two three"})
    )
    assert status == 200
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert events(body) == [
        {"model_name": "words", "model_version": "1", "text_output": word}
        for word in ("one", "two", "three")
    ]
    # A model that is not decoupled: its one response, one event.
    status, _, body = post(
        server, "/v2/models/shout/generate_stream", orjson.dumps({"text_input": "x"})
    )
    assert status == 200
    assert events(body) == [{"model_name": "shout", "model_version": "1", "text_output": "X"}]


def test_a_stream_keeps_its_connection_for_the_next_request(server):
    """After a streamed answer (chunked over HTTP/1.1) the connection serves the next
    request; over HTTP/1.0 the events run to the connection's close."""
    host, port = server.url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        for text in ("a b", "c"):
            conn.request(
                "POST", "/v2/models/words/generate_stream", orjson.dumps({"text_input": text})
            )
            response = conn.getresponse()
            assert response.status == 200
            assert [e["text_output"] for e in events(response.read())] == text.split()
    finally:
        conn.close()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        body = orjson.dumps({"text_input": "x y"})
        sock.sendall(
            b"POST /v2/models/words/generate_stream HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), head
    assert [e["text_output"] for e in events(rest)] == ["x", "y"]


def test_a_client_that_does_not_read_gets_its_request_cancelled(server):
    """A stream's responses wait for a client that does not read them up to 16 MiB, then
    the request is cancelled (its model sees it), not held in memory."""
    mark = server.repository / "flooded"
    mark.unlink(missing_ok=True)
    host, port = server.url.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        body = b'{"text_input": "go"}'
        sock.sendall(
            b"POST /v2/models/flood/generate_stream HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        deadline = time.monotonic() + 20
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # not reading
        cancelled, sent = mark.read_text().split()
    assert cancelled == "True" and int(sent) < 100, (cancelled, sent)
    # The server goes on serving.
    got, _, _ = post(server, "/v2/models/shout/generate", b'{"text_input": "ok"}')
    assert got == 200


def test_an_error_after_the_first_event_is_an_event(server):
    status, _, body = post(
        server, "/v2/models/words/generate_stream", orjson.dumps({"text_input": "a boom b"})
    )
    assert status == 200
    got = events(body)
    assert got[0]["text_output"] == "a"
    assert "the model hit a boom" in got[1]["error"]
    assert len(got) == 2  # the stream ends at the error


def test_generate_answers_one_response(server):
    status, _, body = post(
        server, "/v2/models/words/generate", orjson.dumps({"text_input": "just"})
    )
    assert status == 200 and orjson.loads(body)["text_output"] == "just"
    status, _, body = post(server, "/v2/models/words/generate", orjson.dumps({"text_input": "a b"}))
    assert status == 400
    assert "sent 2 responses" in orjson.loads(body)["error"]
    assert "generate_stream" in orjson.loads(body)["error"]


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_refusals_are_http_errors_saying_what_to_fix(server, route):
    cases = [
        ("nosuch", b'{"text_input": "x"}', 404, "nosuch"),
        ("shout", b"{not json", 400, "failed to parse the generate request JSON"),
        ("shout", b"[1, 2]", 400, "must be a JSON object"),
        ("shout", b'{"text_input": {"nested": 1}}', 400, "string, number or boolean"),
        ("shout", b'{"text_input": "x", "parameters": [1]}', 400, "'parameters'"),
        ("shout", b'{"text_input": "x", "parameters": ""}', 400, "'parameters'"),
        ("shout", b'{"text_input": "x", "extra": [1]}', 400, "parameter 'extra'"),
        ("shout", b'{"suffix": "!"}', 400, "text_input"),  # the input is missing
    ]
    for model, body, status, says in cases:
        got, headers, answer = post(server, f"/v2/models/{model}/{route}", body)
        assert got == status, (model, body, answer)
        assert headers["content-type"] == "application/json"
        assert says in orjson.loads(answer)["error"], (body, answer)
    # The server goes on serving.
    got, _, _ = post(server, "/v2/models/shout/generate", b'{"text_input": "ok"}')
    assert got == 200
