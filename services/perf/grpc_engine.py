"""gRPC load for ``despina perf``: KServe v2 ``ModelInfer`` over HTTP/2 (``--protocol grpc``), and
Triton's bidirectional ``ModelStreamInfer`` (``--protocol grpc-stream``).

Two engines send the same pre-serialized ``ModelInferRequest`` (inputs in
``raw_input_contents``, as ``tritonclient.grpc`` sends them):

- ``h2load`` (nghttp2's C load generator, Debian package ``nghttp2-client``): the request
  is one gRPC frame (1 byte compressed flag, 4 byte big-endian length, protobuf) posted to
  ``/inference.GRPCInferenceService/ModelInfer`` with ``content-type: application/grpc`` and
  ``te: trailers``; ``-t1 -m1 -c C`` keeps C connections with one stream in flight each.
  Latencies come from its ``--log-file``. It cannot read gRPC trailers, so a request that
  fails with a non-OK ``grpc-status`` under HTTP 200 still counts as done: the preflight
  call (a real gRPC call, checked) is what proves the request is valid.
- ``python``: ``grpc.aio`` in spawned worker processes, C coroutines each with one call in
  flight (closed loop) or calls launched on a schedule (``--rate``), bytes in and bytes
  out (no protobuf work per call). It costs the client several times more CPU per call
  than h2load, so it is the fallback when h2load is not installed. It is also the only
  engine for ``grpc-stream``: C streams, each kept open for the whole run with one
  request in flight (written, then its response read); a response carrying
  ``error_message`` counts as an error. Closed loop only.

Needs ``grpcio`` and ``tritonclient[grpc]`` (for the protobuf classes); the Despina venv
has both.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from array import array
from collections import deque
from time import perf_counter_ns

import numpy as np

from despina.services.perf.report import combine_workers

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


class GrpcSetupError(Exception):
    pass


def parse_address(url: str) -> str:
    """``grpc://host:port``, ``http://host:port`` or ``host:port`` -> ``host:port``."""
    for prefix in ("grpc://", "http://"):
        if url.startswith(prefix):
            url = url[len(prefix) :]
    url = url.rstrip("/")
    if ":" not in url:
        url += ":8001"
    return url


def _pb():
    try:
        from tritonclient.grpc import service_pb2
    except ImportError as exc:  # pragma: no cover - environment problem
        raise GrpcSetupError(
            f"--protocol grpc needs tritonclient[grpc] and grpcio: {exc}"
        ) from None
    return service_pb2


def fetch_model(address: str, model: str, version: str, timeout: float = 10.0):
    """Metadata and config over gRPC, as the dicts perf.resolve_inputs() reads."""
    import grpc

    pb = _pb()
    with grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise GrpcSetupError(f"no gRPC server answers at {address}") from None
        meta_call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelMetadata",
            request_serializer=pb.ModelMetadataRequest.SerializeToString,
            response_deserializer=pb.ModelMetadataResponse.FromString,
        )
        config_call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelConfig",
            request_serializer=pb.ModelConfigRequest.SerializeToString,
            response_deserializer=pb.ModelConfigResponse.FromString,
        )
        try:
            meta = meta_call(pb.ModelMetadataRequest(name=model, version=version), timeout=timeout)
        except grpc.RpcError as exc:
            raise GrpcSetupError(
                f"ModelMetadata({model}): {exc.code().name}: {exc.details()}"
            ) from None
        metadata = {
            "inputs": [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                for t in meta.inputs
            ],
            "outputs": [{"name": t.name} for t in meta.outputs],
        }
        try:
            cfg = config_call(pb.ModelConfigRequest(name=model, version=version), timeout=timeout)
            config = {
                "max_batch_size": cfg.config.max_batch_size,
                "input": [{"name": i.name, "dims": list(i.dims)} for i in cfg.config.input],
            }
        except grpc.RpcError:
            config = {}  # MLServer has no ModelConfig: assume max_batch_size 0
    return metadata, config


def build_request(model: str, version: str, tensors, output_names: list[str]) -> bytes:
    """A serialized ModelInferRequest; ``tensors`` is [(InputSpec, raw bytes)]."""
    pb = _pb()
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for spec, raw in tensors:
        t = req.inputs.add()
        t.name = spec.name
        t.datatype = spec.datatype
        t.shape.extend(spec.shape)
        req.raw_input_contents.append(raw)
    for name in output_names:
        req.outputs.add().name = name
    return req.SerializeToString()


def frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def preflight(address: str, request: bytes, timeout: float = 30.0) -> int:
    """One real gRPC call with the exact bytes; returns the response size."""
    import grpc

    with grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(METHOD)
        try:
            response = call(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise GrpcSetupError(f"preflight: {exc.code().name}: {exc.details()}") from None
    return len(response)


def stream_error(response: bytes) -> str | None:
    """The ``error_message`` of a serialized ModelStreamInferResponse, if it has one:
    field 1, a string, present on the wire only when not empty."""
    if response[:1] != b"\n":
        return None
    return _pb().ModelStreamInferResponse.FromString(response).error_message


def preflight_stream(address: str, request: bytes, timeout: float = 30.0) -> int:
    """One request over a real ModelStreamInfer stream; returns the response size."""
    import grpc

    with grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        call = channel.stream_stream(STREAM_METHOD)
        try:
            [response] = list(call(iter([request]), timeout=timeout))
        except grpc.RpcError as exc:
            raise GrpcSetupError(f"preflight: {exc.code().name}: {exc.details()}") from None
        except ValueError:
            raise GrpcSetupError("preflight: the stream did not answer exactly once") from None
    error = stream_error(response)
    if error:
        raise GrpcSetupError(f"preflight: the stream answered an error: {error}")
    return len(response)


# ---------------------------------------------------------------------------------------
# h2load
# ---------------------------------------------------------------------------------------


def h2load_path() -> str | None:
    return shutil.which("h2load")


def _h2load_cmd(h2load: str, address: str, body_path: str, c: int, seconds: float) -> list[str]:
    return [
        h2load,
        "-t1",
        "-m1",
        f"-c{c}",
        f"-D{max(1, round(seconds * 1000))}ms",
        "-d",
        body_path,
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        f"http://{address}{METHOD}",
    ]


def run_h2load(
    address: str,
    request: bytes,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    server_pids: list[int],
    cpu_seconds_of,
) -> dict:
    h2load = h2load_path()
    if h2load is None:
        raise GrpcSetupError("h2load is not installed (apt-get install nghttp2-client)")
    with tempfile.TemporaryDirectory(prefix="despina-h2load-") as tmp:
        body_path = os.path.join(tmp, "body.bin")
        log_path = os.path.join(tmp, "log.tsv")
        with open(body_path, "wb") as f:
            f.write(frame(request))
        cmd = _h2load_cmd(h2load, address, body_path, concurrency, duration_s)
        if warmup_s > 0:
            subprocess.run(
                _h2load_cmd(h2load, address, body_path, concurrency, warmup_s),
                capture_output=True,
                check=False,
            )
        server0 = cpu_seconds_of(server_pids)
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = perf_counter_ns()
        proc = subprocess.run([*cmd, f"--log-file={log_path}"], capture_output=True, text=True)
        t1 = perf_counter_ns()
        usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        server1 = cpu_seconds_of(server_pids)
        out = proc.stdout
        m = re.search(r"finished in ([\d.]+)(m?s)", out)
        r = re.search(
            r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed,"
            r" (\d+) errored, (\d+) timeout",
            out,
        )
        if proc.returncode != 0 or m is None or r is None:
            raise GrpcSetupError(f"h2load failed (rc {proc.returncode}): {proc.stderr or out}")
        window = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        rows = np.loadtxt(log_path, dtype=np.int64, ndmin=2) if os.path.getsize(log_path) else None
    if rows is not None and rows.size:
        ok = rows[:, 1] == 200
        lat = rows[ok, 2] * 1000  # µs -> ns
        bad = int((~ok).sum())
    else:
        lat, bad = np.zeros(0, dtype=np.int64), 0
    succeeded, failed, errored, timeout = (int(r.group(i)) for i in (4, 5, 6, 7))
    if window <= 0:
        window = (t1 - t0) / 1e9
    return {
        "requests": int(lat.size),
        "window_s": window,
        "infer_per_s": lat.size / window,
        "latency_ns": lat.astype(np.int64),
        "errors": failed + errored + timeout + bad,
        "warmup_errors": None,
        "first_error": None,
        "client_cpu_user_s": usage1.ru_utime - usage0.ru_utime,
        "client_cpu_sys_s": usage1.ru_stime - usage0.ru_stime,
        "server_cpu_s": (server1 - server0) if server_pids else None,
        "h2load_succeeded": succeeded,
    }


# ---------------------------------------------------------------------------------------
# grpc.aio (fallback, and the rate mode)
# ---------------------------------------------------------------------------------------


async def _aio_drive(pipe, address, request, nconn, rate, warmup_ns, dur_ns, stream=False):
    import grpc

    channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
    await channel.channel_ready()
    call = channel.unary_unary(METHOD)
    open_stream = channel.stream_stream(STREAM_METHOD)
    lat = array("q")
    state = {"recording": False, "stopped": False, "errors": 0, "warmup_errors": 0}
    first_error: list[str] = []

    def error(exc: BaseException) -> None:
        if state["stopped"]:
            return
        state["errors" if state["recording"] else "warmup_errors"] += 1
        if not first_error:
            first_error.append(f"{type(exc).__name__}: {exc}")

    async def one(t0: int) -> None:
        try:
            await call(request)
        except Exception as exc:  # noqa: BLE001 - every failure counts as an error
            error(exc)
            return
        if state["recording"]:
            lat.append(perf_counter_ns() - t0)

    async def closed_loop() -> None:
        while not state["stopped"]:
            await one(perf_counter_ns())

    async def stream_loop() -> None:
        """One stream for the whole run, one request in flight on it."""
        streaming = open_stream()
        try:
            while not state["stopped"]:
                t0 = perf_counter_ns()
                await streaming.write(request)
                response = await streaming.read()
                if response is grpc.aio.EOF:
                    error(RuntimeError("the server ended the stream"))
                    return
                message = stream_error(response)
                if message:
                    error(RuntimeError(message))
                elif state["recording"]:
                    lat.append(perf_counter_ns() - t0)
        except Exception as exc:  # noqa: BLE001 - every failure counts as an error
            error(exc)
        finally:
            streaming.cancel()

    backlog: deque[int] = deque()
    in_flight = [0]

    def launch(t0: int) -> None:
        in_flight[0] += 1
        task = asyncio.ensure_future(one(t0))
        task.add_done_callback(done)

    def done(_task) -> None:
        in_flight[0] -= 1
        if backlog and not state["stopped"]:
            launch(backlog.popleft())

    async def open_loop(start_ns: int) -> None:
        n = 0
        while not state["stopped"]:
            now = perf_counter_ns()
            due = int((now - start_ns) * rate / 1e9) + 1
            while n < due:
                t = start_ns + int(n * 1e9 / rate)
                n += 1
                if in_flight[0] < nconn:
                    launch(now)  # sent now: the timer's lateness is the client's
                else:
                    backlog.append(t)  # waits for a slot: counts from when it was due
            next_t = start_ns + int(n * 1e9 / rate)
            await asyncio.sleep(max(0.001, (next_t - perf_counter_ns()) / 1e9))

    pipe.send({"ready": True})
    start_ns = pipe.recv()
    await asyncio.sleep(max(0.0, (start_ns - perf_counter_ns()) / 1e9))
    loop_of_one = stream_loop if stream else closed_loop
    tasks = (
        [asyncio.ensure_future(open_loop(start_ns))]
        if rate
        else [asyncio.ensure_future(loop_of_one()) for _ in range(nconn)]
    )
    await asyncio.sleep(max(0.0, (start_ns + warmup_ns - perf_counter_ns()) / 1e9))
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = perf_counter_ns()
    state["recording"] = True
    await asyncio.sleep(max(0.0, (start_ns + warmup_ns + dur_ns - perf_counter_ns()) / 1e9))
    state["recording"] = False
    state["stopped"] = True
    t1 = perf_counter_ns()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    unsent = len(backlog)
    for task in tasks:
        task.cancel()
    await channel.close(grace=None)
    return {
        "latencies": lat.tobytes(),
        "window_ns": t1 - t0,
        "errors": state["errors"],
        "warmup_errors": state["warmup_errors"],
        "first_error": first_error[0] if first_error else None,
        "cpu_user_s": usage1.ru_utime - usage0.ru_utime,
        "cpu_sys_s": usage1.ru_stime - usage0.ru_stime,
        "unsent": unsent,
    }


def _aio_worker(pipe, address, request, nconn, rate, warmup_ns, dur_ns, stream):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = asyncio.run(
            _aio_drive(pipe, address, request, nconn, rate, warmup_ns, dur_ns, stream)
        )
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        result = {"fatal": f"grpc worker: {type(exc).__name__}: {exc}"}
    pipe.send(result)
    pipe.close()


def run_aio(
    address: str,
    request: bytes,
    concurrency: int,
    processes: int,
    rate: float,
    warmup_s: float,
    duration_s: float,
    server_pids: list[int],
    cpu_seconds_of,
    split,
    stream: bool = False,
) -> dict:
    """Spawned workers (gRPC must not be initialized before a fork), one loop each;
    ``stream``: over ModelStreamInfer streams instead of unary calls."""
    ctx = mp.get_context("spawn")
    parts = min(processes, concurrency)
    workers = []
    try:
        for share in split(concurrency, parts):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=_aio_worker,
                args=(
                    child_end,
                    address,
                    request,
                    share,
                    rate / parts,
                    int(warmup_s * 1e9),
                    int(duration_s * 1e9),
                    stream,
                ),
                daemon=True,
            )
            proc.start()
            child_end.close()
            workers.append((proc, parent_end))
        for _, pipe in workers:
            if not pipe.poll(60):
                raise GrpcSetupError("a gRPC worker did not start in time")
            msg = pipe.recv()
            if "fatal" in msg:
                raise GrpcSetupError(msg["fatal"])
        start_ns = perf_counter_ns() + 50_000_000
        for _, pipe in workers:
            pipe.send(start_ns)
        time.sleep(max(0.0, (start_ns + int(warmup_s * 1e9) - perf_counter_ns()) / 1e9))
        server0 = cpu_seconds_of(server_pids)
        time.sleep(max(0.0, duration_s))
        server1 = cpu_seconds_of(server_pids)
        results = []
        for _, pipe in workers:
            if not pipe.poll(60):
                raise GrpcSetupError("a gRPC worker did not finish in time")
            results.append(pipe.recv())
    finally:
        for proc, pipe in workers:
            pipe.close()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
    for res in results:
        if "fatal" in res:
            raise GrpcSetupError(res["fatal"])
    return combine_workers(results, (server1 - server0) if server_pids else None)
