"""Fixtures that start real Despina processes on free loopback ports and always stop
them (process group killed, runtime folders and /dev/shm segments removed)."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_REPOSITORY = ROOT / "model_repository"

# DESPINA_SPEED_PATHS=off in the test run's environment: every server the tests start
# inherits it and takes no speed path (docs/architecture.md#speed-paths).
SPEED_PATHS_OFF = os.environ.get("DESPINA_SPEED_PATHS", "").strip().lower() in (
    "0",
    "false",
    "no",
    "off",
)


def needs_speed_path(path: str) -> pytest.MarkDecorator:
    """Skips a test that measures ``path``'s effect when the run turned speed paths off."""
    return pytest.mark.skipif(SPEED_PATHS_OFF, reason=f"DESPINA_SPEED_PATHS=off: no {path}")


# Tests whose assertions bound a measured time (a stall, a timeout, a delay): they can fail
# on a starved machine for no fault of the code, so `-m "not timing"` leaves them out.
TIMING_TESTS = {
    "test_dynamic_batching.py": {"test_lone_request_waits_at_most_the_queue_delay"},
    "test_failures.py": {"test_python_instance_killed_mid_request"},
    "test_repository.py": {"test_two_instances_run_side_by_side"},
    "test_loadtest.py": {"test_stalls_measures_attacks_on_a_real_server"},
    "test_security_grpc.py": {
        "test_control_frame_flood_gets_enhance_your_calm",
        "test_rapid_reset_runs_no_call_and_ends_the_connection",
        "test_resets_under_the_limit_run_no_call_in_the_same_read",
        "test_distinct_large_header_blocks_are_not_kept",
        "test_compression_bomb_is_refused_quickly",
        "test_stream_with_zero_window_stops_taking_requests",
    },
    "test_security_http.py": {
        "test_content_length_over_max_input_size_gets_413_at_once",
        "test_huge_header_gets_431_and_does_not_stall_others",
        "test_trickled_headers_are_cut_by_the_header_timeout",
        "test_stalled_body_gets_408_after_the_idle_timeout",
        "test_idle_keep_alive_connection_is_closed",
        "test_aiohttp_transport_answers_413_at_once",
    },
    "test_security_internal.py": {
        "test_a_request_that_breaks_in_the_host_fails_alone_and_the_burst_is_answered",
        "test_clients_that_go_away_cancel_their_queued_requests",
        "test_tcp_peers_without_the_cluster_secret_cannot_join",
    },
    "test_security_requests.py": {
        "test_64_mib_of_zeros_is_refused_fast_while_others_are_served",
        "test_message_over_the_default_limit_is_resource_exhausted",
        "test_millions_of_zero_length_bytes_elements_answer_fast",
    },
}


def pytest_collection_modifyitems(items):
    """Marks each test by its folder (``unit``, ``e2e``) and the listed ones ``timing``; a
    listed name that no test file defines stops the run, so the list cannot rot."""
    for file, names in TIMING_TESTS.items():
        tree = ast.parse((ROOT / "tests" / "e2e" / file).read_text())
        unknown = names - {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        if unknown:
            raise pytest.UsageError(f"conftest.TIMING_TESTS: {file} has no {sorted(unknown)}")
    for item in items:
        path = Path(str(item.fspath))
        if path.parent.name in ("unit", "e2e"):
            item.add_marker(getattr(pytest.mark, path.parent.name))
        if getattr(item, "originalname", item.name) in TIMING_TESTS.get(path.name, ()):
            item.add_marker(pytest.mark.timing)


def load_generator():
    """``model_repository/generate.py``, imported by path: the builders of test models."""
    spec = importlib.util.spec_from_file_location(
        "despina_model_generator", SHIPPED_REPOSITORY / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive ports that are free now, picked below the
    kernel's ephemeral range (32768 up on Linux) so that no outgoing connection of
    another test takes one of them before the service under test binds it."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32768 - count)
        held: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no run of {count} free ports found below 32768")


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


class DespinaServer:
    """``despina serve`` as a user runs it, on free ports, logging to a file."""

    def __init__(
        self,
        repository: Path,
        log_path: Path,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``env``: variables the server runs with on top of this process's (for
        example ``{"DESPINA_HTTP_TRANSPORT": "aiohttp"}``)."""
        self.repository = repository
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.metrics_port = free_port()  # --metrics-port in extra_args wins
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 60.0, wait_ready: bool = True) -> DespinaServer:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "despina.services.cli",
                "serve",
                f"--model-repository={self.repository}",
                "--http-port",
                str(self.http_port),
                "--grpc-port",
                str(self.grpc_port),
                "--exit-timeout-secs",
                "5",
                "--metrics-port",
                str(self.metrics_port),
                *self.extra_args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if self.env is None else {**os.environ, **self.env},
        )
        if wait_ready:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()  # never leave a server that did not come up running
                raise
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"despina serve exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                # Ready, and announced: `despina serve` prints its line once it sees the
                # same readiness, which may be a moment after this poll does.
                if (
                    http_status(f"http://{self.url}/v2/health/ready") == 200
                    and "Despina is ready" in self.log()
                ):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"despina did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def child_pids(self, needle: str) -> list[int]:
        """PIDs of this server's processes whose command line contains ``needle``."""
        assert self.proc is not None
        pgid = os.getpgid(self.proc.pid)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) != pgid:
                    continue
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ProcessLookupError):
                continue
            if needle in cmdline:
                found.append(int(entry.name))
        return found

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def scheduler_frozen(server: DespinaServer):
    """The server's scheduler process stopped (SIGSTOP) for the block, then continued."""
    [pid] = server.child_pids("despina.services.scheduler")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def serve_refused(repository: Path, *flags: str) -> tuple[subprocess.CompletedProcess, int]:
    """``despina serve`` with ``flags`` that must stop it before it listens: the finished
    process (stdout and stderr as text) and the HTTP port it was given, to probe."""
    http_port = free_port()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "despina.services.cli",
            "serve",
            f"--model-repository={repository}",
            f"--http-port={http_port}",
            f"--grpc-port={free_port()}",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done, http_port


def serve_shipped_over(transport: str, tmp_path_factory, models: tuple[str, ...]) -> DespinaServer:
    """A started ``despina serve`` of some shipped models whose frontend serves HTTP
    with ``transport`` (``DESPINA_HTTP_TRANSPORT``, inherited by the server only)."""
    repo = tmp_path_factory.mktemp(f"{transport}-repo")
    for model in models:
        shutil.copytree(SHIPPED_REPOSITORY / model, repo / model)
    log = tmp_path_factory.mktemp(f"{transport}-logs") / "serve.log"
    return DespinaServer(repo, log, env={"DESPINA_HTTP_TRANSPORT": transport}).start()


def read_http_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response read from ``sock``: the status, the headers (lower-case
    names) and the body; fails if the connection closes first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {buf!r}"
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed inside a body"
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def request_fields(req) -> tuple:
    """An ``InferenceRequest`` as comparable values (tensor data as bytes): what a
    ``RequestMemo`` rebuilds must equal what the codec decodes."""
    return (
        req.model,
        req.version,
        req.id,
        [
            (t.name, t.datatype, t.shape, None if t.data is None else bytes(t.data), t.parameters)
            for t in req.inputs
        ],
        req.outputs,
        req.parameters,
        req.binary_output,
    )


@pytest.fixture(scope="session")
def generator():
    return load_generator()


@pytest.fixture(scope="session")
def repository(tmp_path_factory, generator) -> Path:
    """The shipped models plus the test-only ones, in a fresh repository."""
    root = tmp_path_factory.mktemp("repo")
    for model in ("simple", "simple_string", "identity_fp32", "add_sub"):
        shutil.copytree(SHIPPED_REPOSITORY / model, root / model)
    generator.identity_all_types(root)
    generator.python_slow(root)
    generator.python_error(root)
    generator.broken(root)
    # identity_fp32 again, with class labels on its output (classification extension)
    classifier = root / "classifier"
    shutil.copytree(SHIPPED_REPOSITORY / "identity_fp32", classifier)
    config = (classifier / "config.pbtxt").read_text().replace('"identity_fp32"', '"classifier"')
    config = config.replace('name: "OUTPUT0"', 'name: "OUTPUT0"\n    label_filename: "labels.txt"')
    (classifier / "config.pbtxt").write_text(config)
    (classifier / "labels.txt").write_text("cat\ndog\nbird\nfish\n")
    return root


@pytest.fixture(scope="session")
def default_server(repository, tmp_path_factory):
    """The test repository served with the default transports (lean HTTP, Despina's own
    HTTP/2 for gRPC)."""
    srv = DespinaServer(
        repository, tmp_path_factory.mktemp("logs") / "serve.log", ["--allow-client-shm=true"]
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def fallback_server(repository, tmp_path_factory):
    """The same repository served with the fallback transports (aiohttp for HTTP,
    grpc.aio for gRPC): test modules that override ``server`` with ``TRANSPORTS`` run
    against both."""
    srv = DespinaServer(
        repository,
        tmp_path_factory.mktemp("logs-fallback") / "serve.log",
        ["--allow-client-shm=true"],
        env=FALLBACK_TRANSPORTS,
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def server(default_server):
    return default_server


# A test module runs against both transports of each protocol by overriding ``server``:
#     @pytest.fixture(scope="module", params=TRANSPORTS)
#     def server(request):
#         return request.getfixturevalue(f"{request.param}_server")
TRANSPORTS = ["default", "fallback"]
FALLBACK_TRANSPORTS = {"DESPINA_HTTP_TRANSPORT": "aiohttp", "DESPINA_GRPC_TRANSPORT": "grpcio"}


def assert_serves_simple(url: str) -> None:
    """A normal inference of the shipped ``simple`` over HTTP, checked value by value:
    the server still serves after whatever the test did to it."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    try:
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        inputs = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        for inp in inputs:
            inp.set_data_from_numpy(a)
        result = client.infer("simple", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), 0 * a)
    finally:
        client.close()


@pytest.fixture(scope="session")
def server_without_client_shm(tmp_path_factory):
    """``simple`` on a server started without --allow-client-shm (Triton's flag)."""
    repo = tmp_path_factory.mktemp("repo-no-shm")
    (repo / "simple").symlink_to(SHIPPED_REPOSITORY / "simple")
    srv = DespinaServer(repo, tmp_path_factory.mktemp("logs") / "serve.log").start()
    yield srv
    srv.stop()


@pytest.fixture()
def regions():
    """Client shared-memory regions made with tritonclient's utilities, as a user makes
    them: ``make(byte_size) -> (name, key, handle)``; always destroyed."""
    import tritonclient.utils.shared_memory as shm

    made = []

    def make(byte_size: int):
        name = f"despina_test_{uuid.uuid4().hex[:8]}"
        handle = shm.create_shared_memory_region(name, "/" + name, byte_size)
        made.append(handle)
        return name, "/" + name, handle

    yield make
    for handle in made:
        try:
            shm.destroy_shared_memory_region(handle)
        except Exception:
            pass


@pytest.fixture()
def shm_dir_entries():
    """Names in /dev/shm made by hand (links, directories, fifos):
    ``make(maker) -> name``, where ``maker(path)`` creates it; always removed."""
    made: list[str] = []

    def make(maker) -> str:
        name = f"despina_test_{uuid.uuid4().hex[:8]}"
        path = f"/dev/shm/{name}"
        maker(path)
        made.append(path)
        return name

    yield make
    for path in made:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)


@pytest.fixture()
def http_client(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.url, network_timeout=60)
    yield client
    client.close()
