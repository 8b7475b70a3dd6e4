"""Restricted APIs as Triton (#14): ``--http-restricted-api`` and
``--grpc-restricted-protocol``, ``<group list>:<header>=<value>``.

Two servers cover both transports of each protocol: ``lean`` (the lean HTTP/1.1 server
and h2server) and ``fallback`` (aiohttp and grpc.aio). Each restricts every group with a
route but one, under two different headers, so that a request of one group carrying the
other group's header is still refused, and the one free group shows that others are
unaffected. Every refusal is Triton's: HTTP 403 ``{"error": "This API is restricted,
expecting header '<header>'"}``, gRPC UNAVAILABLE ``This protocol is restricted, expecting
header 'triton-grpc-protocol-<key>'``; right after it, the same server answers a normal
inference (no process restarted)."""

from __future__ import annotations

import http.client
import shutil
import socket
import time
from functools import partial

import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from despina.services.frontend.restricted import GROUPS, parse

from conftest import SHIPPED_REPOSITORY, DespinaServer, serve_refused

# A request of each group that has a route: (method, path, body, status when allowed)
HTTP_REQUESTS = {
    "health": [
        ("GET", "/v2/health/live", None, 200),
        ("GET", "/v2/health/ready", None, 200),
        ("GET", "/v2/models/simple/ready", None, 200),
        ("GET", "/v2/models/simple/versions/1/ready", None, 200),
    ],
    "metadata": [("GET", "/v2", None, 200), ("GET", "/v2/models/simple", None, 200)],
    "inference": [
        (
            "POST",
            "/v2/models/simple/infer",
            orjson.dumps(
                {
                    "inputs": [
                        {"name": n, "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}
                        for n in ("INPUT0", "INPUT1")
                    ]
                }
            ),
            200,
        )
    ],
    "model-config": [("GET", "/v2/models/simple/config", None, 200)],
    "model-repository": [("POST", "/v2/repository/index", b"{}", 200)],
    "shared-memory": [
        ("GET", "/v2/systemsharedmemory/status", None, 200),
        ("GET", "/v2/cudasharedmemory/status", None, 200),
    ],
}
HEADER_A = ("Admin-Key", "a-secret")
HEADER_B = ("config-key", "b=secret")  # a value with '=' in it: split at the first '='
GRPC_A = ("k1", "v1")
GRPC_B = ("k2", "v2")
PREFIX = "triton-grpc-protocol-"
SERVERS = {
    # name: (HTTP transport, gRPC transport, the group left free)
    "lean": ("lean", "auto", "shared-memory"),
    "fallback": ("aiohttp", "grpcio", "health"),
}
GROUPS_A = ("health", "metadata", "inference")  # the others, but the free one, under B


def _restrictions(free: str) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """group -> (header, value) over HTTP and over gRPC (the prefixed header)."""
    http_, grpc_ = {}, {}
    for group in GROUPS:
        if group == free:
            continue
        http_[group] = HEADER_A if group in GROUPS_A else HEADER_B
        key, value = GRPC_A if group in GROUPS_A else GRPC_B
        grpc_[group] = (PREFIX + key, value)
    return http_, grpc_


def _flags(free: str) -> list[str]:
    a = [g for g in GROUPS if g in GROUPS_A and g != free]
    b = [g for g in GROUPS if g not in GROUPS_A and g != free]
    return [
        f"--http-restricted-api={','.join(a)}:{HEADER_A[0]}={HEADER_A[1]}",
        f"--http-restricted-api={','.join(b)}:{HEADER_B[0]}={HEADER_B[1]}",
        f"--grpc-restricted-protocol={','.join(a)}:{GRPC_A[0]}={GRPC_A[1]}",
        "--grpc-restricted-protocol",
        f"{','.join(b)}:{GRPC_B[0]}={GRPC_B[1]}",
    ]


def _get(server: DespinaServer, method: str, path: str, body, headers: dict) -> tuple:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module", params=sorted(SERVERS))
def restricted(request, tmp_path_factory):
    """(name, server, HTTP restrictions, gRPC restrictions) of a started server."""
    name = request.param
    http_transport, grpc_transport, free = SERVERS[name]
    repo = tmp_path_factory.mktemp(f"restricted-{name}")
    shutil.copytree(SHIPPED_REPOSITORY / "simple", repo / "simple")
    log = tmp_path_factory.mktemp(f"restricted-{name}-logs") / "serve.log"
    server = DespinaServer(
        repo,
        log,
        _flags(free),
        env={"DESPINA_HTTP_TRANSPORT": http_transport, "DESPINA_GRPC_TRANSPORT": grpc_transport},
    )
    server.start(wait_ready=False)
    http_r, grpc_r = _restrictions(free)
    try:
        # Ready: asked with health's header where health is restricted; the supervisor
        # asks the same way before it prints its ready line.
        health = dict([http_r["health"]]) if "health" in http_r else {}
        deadline = time.monotonic() + 60
        while True:
            assert server.proc.poll() is None, server.log()
            try:
                if _get(server, "GET", "/v2/health/ready", None, health)[0] == 200 and (
                    "Despina is ready" in server.log()
                ):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        transport = "grpc.aio" if grpc_transport == "grpcio" else "lean HTTP/2 transport"
        assert transport in server.log()
        yield name, server, http_r, grpc_r
    finally:
        server.stop()


def _infer_http(server: DespinaServer, http_r: dict) -> None:
    """A normal inference over HTTP, with inference's header where it is restricted."""
    client = httpclient.InferenceServerClient(server.url)
    inputs = []
    for n in ("INPUT0", "INPUT1"):
        tensor = httpclient.InferInput(n, [1, 16], "INT32")
        tensor.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))
        inputs.append(tensor)
    headers = dict([http_r["inference"]]) if "inference" in http_r else None
    result = client.infer("simple", inputs, headers=headers)
    assert result.as_numpy("OUTPUT0").tolist() == [list(range(0, 32, 2))]


def test_http_matrix(restricted):
    """Each group: without the header, with a wrong value, with the other group's header:
    Triton's 403; with its header: served. The free group needs nothing."""
    name, server, http_r, _ = restricted
    for group, requests in HTTP_REQUESTS.items():
        for method, path, body, ok in requests:
            if group not in http_r:
                status, _ = _get(server, method, path, body, {})
                assert status == ok, (name, path)
                continue
            header, value = http_r[group]
            other = HEADER_B if (header, value) == HEADER_A else HEADER_A
            expected = orjson.dumps(
                {"error": f"This API is restricted, expecting header '{header}'"}
            )
            for headers in ({}, {header: value + "x"}, {header: value.upper()}, dict([other])):
                status, got = _get(server, method, path, body, headers)
                assert (status, got) == (403, expected), (name, path, headers)
            # Header names are case-insensitive over HTTP/1.1; the value is exact.
            for headers in ({header: value}, {header.lower(): value}):
                status, got = _get(server, method, path, body, headers)
                assert status == ok, (name, path, got)
        _infer_http(server, http_r)  # right after the refusals: served


def test_http_refusal_through_tritonclient(restricted):
    """tritonclient sees Triton's message; with ``headers=`` every call succeeds."""
    name, server, http_r, _ = restricted
    client = httpclient.InferenceServerClient(server.url)
    calls = {
        "health": lambda h: client.is_server_live(headers=h),
        "metadata": lambda h: client.get_server_metadata(headers=h)["name"] == "triton",
        "model-config": lambda h: client.get_model_config("simple", headers=h)["name"] == "simple",
        "model-repository": lambda h: (
            client.get_model_repository_index(headers=h)[0]["name"] == "simple"
        ),
        "shared-memory": lambda h: client.get_system_shared_memory_status(headers=h) == [],
    }
    for group, call in calls.items():
        if group not in http_r:
            assert call(None)
            continue
        header, value = http_r[group]
        if group == "health":  # tritonclient turns a failing live check into False
            assert call(None) is False
        else:
            with pytest.raises(InferenceServerException, match="This API is restricted"):
                call(None)
        assert call({header: value}), (name, group)
    _infer_http(server, http_r)


def _grpc_calls(client) -> dict:
    return {
        "health": [
            lambda h: client.is_server_live(headers=h),
            lambda h: client.is_server_ready(headers=h),
            lambda h: client.is_model_ready("simple", headers=h),
        ],
        "metadata": [
            lambda h: client.get_server_metadata(headers=h).name == "triton",
            lambda h: client.get_model_metadata("simple", headers=h).name == "simple",
        ],
        "model-config": [
            lambda h: client.get_model_config("simple", headers=h).config.name == "simple"
        ],
        "model-repository": [
            lambda h: client.get_model_repository_index(headers=h).models[0].name == "simple"
        ],
        "shared-memory": [
            lambda h: len(client.get_system_shared_memory_status(headers=h).regions) == 0,
            lambda h: len(client.get_cuda_shared_memory_status(headers=h).regions) == 0,
        ],
        "inference": [lambda h: _infer_grpc(client, h)],
    }


def _infer_grpc(client, headers) -> bool:
    inputs = []
    for n in ("INPUT0", "INPUT1"):
        tensor = grpcclient.InferInput(n, [1, 16], "INT32")
        tensor.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))
        inputs.append(tensor)
    result = client.infer("simple", inputs, headers=headers)
    return result.as_numpy("OUTPUT0").tolist() == [list(range(0, 32, 2))]


def test_grpc_matrix(restricted):
    """Each group over gRPC: refused with UNAVAILABLE and Triton's message without its
    (prefixed) header, with a wrong value, or with the other group's; served with it."""
    name, server, _, grpc_r = restricted
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for group, calls in _grpc_calls(client).items():
        for call in calls:
            if group not in grpc_r:
                assert call(None), (name, group)
                continue
            header, value = grpc_r[group]
            other = (PREFIX + GRPC_B[0], GRPC_B[1])
            if (header, value) == other:
                other = (PREFIX + GRPC_A[0], GRPC_A[1])
            unprefixed = header[len(PREFIX) :]
            for headers in (None, {header: value + "x"}, dict([other]), {unprefixed: value}):
                with pytest.raises(InferenceServerException) as refused:
                    call(headers)
                assert refused.value.status() == "StatusCode.UNAVAILABLE", (name, group)
                assert refused.value.message() == (
                    f"This protocol is restricted, expecting header '{header}'"
                )
            assert call({header: value}), (name, group)
    inference = dict([grpc_r["inference"]]) if "inference" in grpc_r else None
    assert _infer_grpc(client, inference)  # right after the refusals: served


def _collect(results: list, result, error) -> None:
    results.append((result, error))


def test_grpc_stream_restricted(restricted):
    """ModelStreamInfer is inference: a stream without the header ends with the refusal
    before any request runs; with it, it answers."""
    _, server, _, grpc_r = restricted
    header, value = grpc_r["inference"]
    inputs = []
    for n in ("INPUT0", "INPUT1"):
        tensor = grpcclient.InferInput(n, [1, 16], "INT32")
        tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
        inputs.append(tensor)
    for headers, expect_ok in ((None, False), ({header: value}, True)):
        results: list = []
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.start_stream(partial(_collect, results), headers=headers)
        try:
            client.async_stream_infer("simple", inputs)
        except InferenceServerException as exc:
            # The refusal came first: the stream is over before the request is sent.
            assert not expect_ok and "no longer in valid state" in exc.message()
        deadline = time.monotonic() + 10
        while not results and time.monotonic() < deadline:
            time.sleep(0.02)
        client.stop_stream()
        assert results, headers
        result, error = results[0]
        if expect_ok:
            assert error is None and result.as_numpy("OUTPUT0").tolist() == [[2] * 16]
        else:
            assert result is None and "This protocol is restricted" in str(error)
            assert f"expecting header '{header}'" in str(error)


# --- malformed values stop the server -------------------------------------------------


@pytest.mark.parametrize(
    "flag, says",
    [
        ("--http-restricted-api=health", "option format is '<api list>:<header>=<value>'"),
        ("--http-restricted-api=health:admin-key", "option format is"),
        ("--http-restricted-api=health:=v", "option format is"),
        ("--http-restricted-api=health:k=", "option format is"),
        ("--http-restricted-api=:k=v", "option format is"),
        ("--http-restricted-api=healthz:k=v", "unknown restricted api 'healthz'"),
        ("--http-restricted-api=health,health:k=v", "can not be specified in multiple"),
        ("--http-restricted-api=health:k=v\x01", "no control characters"),
        ("--grpc-restricted-protocol=inference", "option format is '<protocol list>"),
        ("--grpc-restricted-protocol=inference,nope:k=v", "unknown restricted protocol 'nope'"),
    ],
)
def test_malformed_value_stops_the_server(tmp_path, flag, says):
    done, http_port = serve_refused(tmp_path, flag)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "refusing to start" in done.stderr, done.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", http_port)) != 0


def test_group_named_twice_across_flags_stops_the_server(tmp_path):
    """As Triton: a group belongs to one header, whichever flag names it again."""
    done, http_port = serve_refused(
        tmp_path,
        "--grpc-restricted-protocol=health,inference:a=1",
        "--grpc-restricted-protocol=inference:b=2",
    )
    assert done.returncode == 2, done.stderr
    assert "restricted protocol 'inference' can not be specified in multiple" in done.stderr


def test_parse_as_triton():
    """Split at the first ':' and the first '=' after it; the gRPC key gets Triton's
    prefix; every group of the list shares the header."""
    assert parse(["health,inference:a:b=c=d"], "--http-restricted-api") == {
        "health": ("a:b", "c=d"),
        "inference": ("a:b", "c=d"),
    }
    assert parse(["trace,logging:k=v"], "--grpc-restricted-protocol") == {
        "trace": ("triton-grpc-protocol-k", "v"),
        "logging": ("triton-grpc-protocol-k", "v"),
    }
    assert parse(None, "--http-restricted-api") == {}
