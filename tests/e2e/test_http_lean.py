"""The lean HTTP/1.1 transport (services/frontend/http/lean.py) over raw sockets, against
a real ``despina serve`` with ``DESPINA_HTTP_TRANSPORT=lean``: pipelining, chunked
bodies, keep-alive and close, malformed requests, 404/405, percent-decoded paths, large
bodies and responses, clients that go away. The routes' behaviour is the e2e tests'
(run them with the variable exported to cover this transport)."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from conftest import DespinaServer, serve_shipped_over

IDENTITY = "/v2/models/identity_fp32/infer"


@pytest.fixture(scope="module")
def lean(tmp_path_factory):
    srv = serve_shipped_over("lean", tmp_path_factory, ("simple", "identity_fp32"))
    yield srv
    assert srv.stop() == 0


class Conn:
    """A raw client connection that reads responses one at a time."""

    def __init__(self, server: DespinaServer) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        self.buf += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"closed before a response: {self.buf!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        while len(self.buf) < length:
            assert self._fill(), "closed inside a body"
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed(self) -> bool:
        """True once the server has closed the connection (nothing more to read)."""
        try:
            return not self.sock.recv(1) and not self.buf
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
        + body
    )


def simple_json() -> bytes:
    data = list(range(16))
    return json.dumps(
        {
            "inputs": [
                {"name": n, "datatype": "INT32", "shape": [1, 16], "data": data}
                for n in ("INPUT0", "INPUT1")
            ]
        }
    ).encode()


def test_pipelined_requests_in_one_write_are_answered_in_order(lean):
    conn = Conn(lean)
    # An async route (ready awaits the scheduler) before sync ones: the order holds.
    conn.send(
        get("/v2/health/ready")
        + get("/v2")
        + post("/v2/models/simple/infer", simple_json())
        + get("/v2/health/live")
    )
    status, _, body = conn.response()
    assert (status, body) == (200, b"")
    status, headers, body = conn.response()
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body)["name"] == "triton"
    status, _, body = conn.response()
    assert status == 200
    outputs = {o["name"]: o["data"] for o in json.loads(body)["outputs"]}
    assert outputs["OUTPUT0"] == [2 * i for i in range(16)]
    status, _, body = conn.response()
    assert (status, body) == (200, b"")
    conn.close()


def test_chunked_request_body(lean):
    body = simple_json()
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 100]), body[i : i + 100])
        for i in range(0, len(body), 100)
    )
    conn = Conn(lean)
    conn.send(
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    )
    status, _, answer = conn.response()
    assert status == 200
    outputs = {o["name"]: o["data"] for o in json.loads(answer)["outputs"]}
    assert outputs["OUTPUT1"] == [0] * 16
    # The connection stays usable.
    conn.send(get("/v2/health/live"))
    assert conn.response()[0] == 200
    conn.close()


@pytest.mark.parametrize(
    "data, statuses",
    [
        # Malformed: what came before is answered, then 400 and close.
        (get("/v2/health/live") + b"NOT HTTP AT ALL\r\n\r\n", [200, 400]),
        (get("/v2/health/live", "Connection: close\r\n") + get("/v2"), [200]),
        # No upgrades: answered as HTTP/1.1, then closed.
        (get("/v2", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"), [200]),
    ],
    ids=["malformed", "connection-close", "upgrade"],
)
def test_answered_then_closed(lean, data, statuses):
    conn = Conn(lean)
    conn.send(data)
    for expected in statuses:
        status, headers, _ = conn.response()
        assert status == expected
    assert headers["connection"] == "close"
    assert conn.closed()
    conn.close()


def test_http10_closes_unless_keep_alive(lean):
    conn = Conn(lean)
    conn.send(b"GET /v2/health/live HTTP/1.0\r\n\r\n")
    assert conn.response()[0] == 200
    assert conn.closed()
    conn.close()
    conn = Conn(lean)
    conn.send(b"GET /v2/health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, _ = conn.response()
    assert status == 200 and headers["connection"].lower() == "keep-alive"
    conn.send(b"GET /v2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert conn.response()[0] == 200
    conn.close()


def test_unknown_path_404_and_wrong_method_405(lean):
    conn = Conn(lean)
    for path in ("/v2/nothing", "/v2/", "/v3", "/v2/models//ready", "/v2/models/simple/extra"):
        conn.send(get(path))
        status, headers, body = conn.response()
        assert (status, headers["content-type"]) == (404, "application/json"), path
        assert json.loads(body) == {"error": "Not Found"}, path
    conn.send(post("/v2/health/live", b""))
    status, headers, body = conn.response()
    assert (status, headers["allow"]) == (405, "GET")
    assert json.loads(body) == {"error": "Method Not Allowed"}
    conn.send(get("/v2/models/simple/versions/1/infer"))
    status, headers, _ = conn.response()
    assert (status, headers["allow"]) == (405, "POST")
    conn.send(get("/v2/health/live"))
    assert conn.response()[0] == 200  # still open
    conn.close()


def test_percent_decoded_path_segments_and_query(lean):
    conn = Conn(lean)
    conn.send(get("/v2/models/%73imple/versions/%31?x=1"))
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)["name"] == "simple"
    conn.send(get("/v2/models/no%20such/ready"))
    assert conn.response()[0] == 400
    conn.close()


def test_expect_100_continue(lean):
    conn = Conn(lean)
    body = simple_json()
    conn.send(
        b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    while b"\r\n\r\n" not in conn.buf:
        assert conn._fill()
    assert conn.buf.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    conn.buf = conn.buf[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
    conn.send(body)
    assert conn.response()[0] == 200
    conn.close()


def binary_identity(values: np.ndarray) -> bytes:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": [1, values.size],
                    "parameters": {"binary_data_size": values.nbytes},
                }
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return post(
        IDENTITY,
        header + values.tobytes(),
        f"Inference-Header-Content-Length: {len(header)}\r\n"
        "Content-Type: application/octet-stream\r\n",
    )


def test_large_binary_request_and_response_then_keep_alive(lean):
    values = np.arange(1 << 20, dtype=np.float32)  # 4 MiB each way: shared memory, writelines
    conn = Conn(lean)
    conn.send(binary_identity(values) + binary_identity(values[:16]) + get("/v2/health/live"))
    for expected in (values, values[:16]):
        status, headers, body = conn.response()
        assert status == 200 and headers["content-type"] == "application/octet-stream"
        json_length = int(headers["inference-header-content-length"])
        np.testing.assert_array_equal(np.frombuffer(body[json_length:], np.float32), expected)
    assert conn.response()[0] == 200
    conn.close()


def test_client_gone_mid_request_leaves_the_server_working(lean):
    values = np.arange(1 << 20, dtype=np.float32)
    request = binary_identity(values)
    for cut in (len(request) // 2, len(request)):
        conn = Conn(lean)
        conn.send(request[:cut])  # half a body (a block is being filled), or all of it
        conn.close()
    time.sleep(0.2)
    conn = Conn(lean)
    conn.send(binary_identity(values))
    status, headers, body = conn.response()
    assert status == 200
    json_length = int(headers["inference-header-content-length"])
    np.testing.assert_array_equal(np.frombuffer(body[json_length:], np.float32), values)
    conn.close()


def test_body_size_mismatch_and_bad_header_length(lean):
    conn = Conn(lean)
    conn.send(post(IDENTITY, b"{}", "Inference-Header-Content-Length: nope\r\n"))
    status, _, body = conn.response()
    assert status == 400 and "Inference-Header-Content-Length" in json.loads(body)["error"]
    conn.send(post(IDENTITY, b"{}", "Inference-Header-Content-Length: 10\r\n"))
    assert conn.response()[0] == 400
    conn.send(get("/v2/health/live"))
    assert conn.response()[0] == 200
    conn.close()


def test_frontend_does_not_load_aiohttp(lean):
    (frontend,) = lean.child_pids("despina.services.frontend")
    maps = open(f"/proc/{frontend}/maps").read()
    assert "httptools" in maps and "aiohttp" not in maps


def binary_simple(a: np.ndarray, b: np.ndarray, model: str = "simple") -> bytes:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": "INT32",
                    "shape": [1, 16],
                    "parameters": {"binary_data_size": 64},
                }
                for name in ("INPUT0", "INPUT1")
            ],
            "outputs": [{"name": "OUTPUT1", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return post(
        f"/v2/models/{model}/infer",
        header + a.tobytes() + b.tobytes(),
        f"Inference-Header-Content-Length: {len(header)}\r\n",
    )


def test_a_repeated_header_gets_each_request_data_and_each_model_check(lean):
    """The connection remembers the last binary header (inference.RequestMemo): requests that
    repeat it are answered from their own bytes, and sent to another model, it is
    checked against that model's inputs."""
    rng = np.random.default_rng(7)
    conn = Conn(lean)
    for _ in range(4):
        a, b = rng.integers(-1000, 1000, (2, 1, 16), dtype=np.int32)
        conn.send(binary_simple(a, b))
        status, headers, body = conn.response()
        assert status == 200, body
        json_length = int(headers["inference-header-content-length"])
        np.testing.assert_array_equal(np.frombuffer(body[json_length:], np.int32), (a - b)[0])
    conn.send(binary_simple(a, b, "identity_fp32"))
    status, _, body = conn.response()
    assert status == 400
    error = json.loads(body)["error"]
    assert "'INPUT0' data-type is 'INT32'" in error and "'identity_fp32'" in error, error
    conn.send(binary_simple(b, a))  # and back: still answered
    status, headers, body = conn.response()
    assert status == 200
    json_length = int(headers["inference-header-content-length"])
    np.testing.assert_array_equal(np.frombuffer(body[json_length:], np.int32), (b - a)[0])
    conn.close()
