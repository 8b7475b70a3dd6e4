"""Issue #14: the server's identity as Triton's clients expect it, and Triton's JSON body on
every HTTP error, on both HTTP transports (lean and aiohttp) and both gRPC clients.

Triton's example clients and qa tests check ``GET /v2`` and gRPC ``ServerMetadata`` for
``name == "triton"``; Despina names itself where no client looks (``despina --version``,
the start-up log, the HTTP ``Server`` header). An unknown route or method gets Triton's
``{"error": "Not Found"}`` (404) or ``{"error": "Method Not Allowed"}`` (405), which
``tritonclient.http`` parses (a text body made it report a JSON parse error instead)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from importlib.metadata import version

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.http._utils import _raise_if_error
from tritonclient.utils import InferenceServerException

from conftest import DespinaServer, assert_serves_simple, read_http_response, serve_shipped_over

TRITON_VERSION = "2.51.0"
# Triton's extension names, in Triton's order, for what works in Despina today.
EXTENSIONS = [
    "classification",
    "model_repository",
    "model_repository(unload_dependents)",
    "model_configuration",
    "system_shared_memory",
    "binary_tensor_data",
    "parameters",
    "trace",
    "logging",
]
DESPINA_VERSION = version("despina")  # pyproject.toml's, as installed
SERVER_HEADER = f"despina/{DESPINA_VERSION}"


@pytest.fixture(scope="module", params=["lean", "aiohttp"])
def server(request, tmp_path_factory):
    srv = serve_shipped_over(request.param, tmp_path_factory, ("simple",))
    srv.transport = request.param  # type: ignore[attr-defined]
    yield srv
    assert srv.stop() == 0


def raw(server: DespinaServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; the status, headers (lower-case names) and body."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(request)
        return read_http_response(sock)


def test_server_metadata_is_tritons_over_http_grpc_and_aio(server):
    meta = httpclient.InferenceServerClient(server.url).get_server_metadata()
    assert meta == {"name": "triton", "version": TRITON_VERSION, "extensions": EXTENSIONS}
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    gmeta = grpc.get_server_metadata()
    assert (gmeta.name, gmeta.version, list(gmeta.extensions)) == (
        "triton",
        TRITON_VERSION,
        EXTENSIONS,
    )
    grpc.close()

    async def aio() -> tuple:
        client = grpcaio.InferenceServerClient(server.grpc_url)
        try:
            m = await client.get_server_metadata()
            return m.name, m.version, list(m.extensions)
        finally:
            await client.close()

    assert asyncio.run(aio()) == ("triton", TRITON_VERSION, EXTENSIONS)


def test_server_header_names_despina(server):
    for request in (
        b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/nowhere HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        _, headers, _ = raw(server, request)
        assert headers["server"] == SERVER_HEADER, request


@pytest.mark.parametrize(
    "path",
    ["/v2/nowhere", "/v2/", "/v3", "/", "/v2/models/simple/extra", "/v2/repository/x/y/z/w"],
)
def test_unknown_route_is_tritons_json_404(server, path):
    status, headers, body = raw(server, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert (status, headers["content-type"]) == (404, "application/json"), path
    assert json.loads(body) == {"error": "Not Found"}, path
    assert_serves_simple(server.url)


def test_wrong_method_is_tritons_json_405(server):
    for request, allow in (
        (b"POST /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "GET"),
        (b"DELETE /v2 HTTP/1.1\r\nHost: x\r\n\r\n", "GET"),
        (b"GET /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\n\r\n", "POST"),
        (b"PUT /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "POST"),
    ):
        status, headers, body = raw(server, request)
        assert (status, headers["content-type"], headers["allow"]) == (
            405,
            "application/json",
            allow,
        ), request
        assert json.loads(body) == {"error": "Method Not Allowed"}, request
    assert_serves_simple(server.url)


def test_tritonclient_reads_the_servers_message_on_unknown_routes(server):
    """tritonclient.http parses the error body of a route the server does not serve, as
    each of its calls does (``_get`` then ``_raise_if_error``): the server's message and
    status (with a text body it raised a JSON parse error of its own)."""
    client = httpclient.InferenceServerClient(server.url)
    for path in ("v2/nowhere", "v2/models/simple/not_a_route"):
        response = client._get(path, None, None)
        with pytest.raises(InferenceServerException) as info:
            _raise_if_error(response)
        assert (info.value.message(), info.value.status()) == ("Not Found", "404"), path
    assert_serves_simple(server.url)
    client.close()


def test_despina_version_names_despina_and_triton():
    out = subprocess.run(
        [sys.executable, "-m", "despina.services.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out.startswith(f"despina {DESPINA_VERSION} "), out
    assert f"Triton Inference Server {TRITON_VERSION}" in out, out


def test_start_up_log_names_despina(server):
    assert f"despina {DESPINA_VERSION} (answers as Triton Inference Server" in server.log()


def test_server_name_flag(tmp_path_factory):
    repo = tmp_path_factory.mktemp("named-repo")
    (repo / "empty").mkdir()
    srv = DespinaServer(
        repo, tmp_path_factory.mktemp("named-logs") / "serve.log", ["--server-name=mine"]
    ).start()
    try:
        assert httpclient.InferenceServerClient(srv.url).get_server_metadata()["name"] == "mine"
        grpc = grpcclient.InferenceServerClient(srv.grpc_url)
        assert grpc.get_server_metadata().name == "mine"
        assert grpc.get_server_metadata().version == TRITON_VERSION
        grpc.close()
    finally:
        assert srv.stop() == 0


def test_malformed_http_is_400_json(server):
    """Malformed HTTP gets 400 with Triton's JSON body on both transports (aiohttp's own
    refusals go through ``app.JsonErrorRunner``), and the server serves on."""
    status, headers, body = raw(server, b"GET /v2 HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"].startswith("Bad Request: ")
    assert_serves_simple(server.url)
