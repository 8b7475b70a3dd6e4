#!/usr/bin/env python3
"""Server overhead on an ONNX model: Despina's p50 at c=1 minus what the model's own
``InferenceSession.run`` takes in-process, on the same machine, in the same run.

    python loadtest/overhead.py [--model simple] [--rounds 3] [-d 5] [--json-out F]

Each round, in turn:

1. ``despina serve`` (started once, on the shipped repository) driven by despina perf
   at c=1 over HTTP binary and gRPC: p50 per protocol.
2. The model's file in an ``onnxruntime.InferenceSession`` in this process, with the
   same inputs: the p50 of ``run`` called back to back (warm caches: the fastest it
   gets), and paced, one call per server p50 with the process asleep in between (as the
   backend host sees its requests at c=1: on this VM a sleeping core comes back cold,
   and the call takes 2-3x longer).
3. The floor: a one-process uvloop server answering every request with a fixed body,
   driven the same way: what the client, the kernel and one Python process cost.

Overhead = server p50 - paced ``run`` p50 (and - back-to-back, as the stricter figure);
above the floor = server p50 - floor p50. Prints one table and writes JSON with
``--json-out``. ``compare`` runs the same measurement in each of its rounds (``measure``,
``summarize``, ``floor_server``) and shows it as Despina-only rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from local_despina import ROOT, despina, free_port, perf_run

PROTOCOLS = ("http-binary", "grpc")


def perf_p50(url: str, model: str, protocol: str, seconds: float) -> float:
    """p50 ms of one despina perf run at c=1."""
    return perf_run(url, model, protocol, 1, seconds, 1)["p50_ms"]


def session_p50_us(model: str, gap_s: float, calls: int) -> float:
    """p50 of ``InferenceSession.run`` in this process, ``gap_s`` asleep between calls."""
    import onnxruntime as ort

    path = ROOT / "model_repository" / model / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {}
    for spec in session.get_inputs():
        shape = [1 if not isinstance(d, int) or d < 0 else d for d in spec.shape]
        dtype = {"tensor(int32)": np.int32, "tensor(float)": np.float32}[spec.type]
        feed[spec.name] = rng.integers(0, 100, shape).astype(dtype)
    for _ in range(50):
        session.run(None, feed)
    times = []
    for _ in range(calls):
        if gap_s:
            time.sleep(gap_s)
        start = time.perf_counter_ns()
        session.run(None, feed)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


# --- the floor: one process, a fixed answer -------------------------------------------

METADATA = json.dumps(
    {
        "name": "floor",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 16]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "INT32", "shape": [1, 16]}],
    }
).encode()
CONFIG = b'{"name": "floor", "max_batch_size": 0, "input": [], "output": []}'
ANSWER = b'{"model_name":"floor","outputs":[]}'


class _Floor(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length bodies only: enough for despina perf."""

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            target = head.split(b" ", 2)[1]
            body = (
                ANSWER
                if head.startswith(b"post")
                else CONFIG
                if target.endswith(b"/config")
                else METADATA
            )
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )


def _serve_floor(port: int) -> None:
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Floor, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


@contextlib.contextmanager
def floor_server():
    """The one-process floor server, forked, on a free port; yields its URL."""
    port = free_port()
    floor = mp.get_context("fork").Process(target=_serve_floor, args=(port,), daemon=True)
    floor.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        floor.terminate()
        floor.join(5)


def measure(http_url: str, grpc_url: str, floor_url: str, model: str, seconds: float) -> dict:
    """One round: the server's p50 per protocol, the floor's, and ``run`` in-process."""
    record: dict = {}
    for protocol in PROTOCOLS:
        url = grpc_url if protocol == "grpc" else http_url
        record[protocol] = perf_p50(url, model, protocol, seconds)
    record["floor"] = perf_p50(floor_url, "floor", "http-binary", seconds)
    calls = int(seconds / (record["http-binary"] / 1e3))
    record["run_back_to_back_us"] = session_p50_us(model, 0.0, 5000)
    record["run_paced_us"] = session_p50_us(model, record["http-binary"] / 1e3, min(calls, 5000))
    return record


def summarize(rounds: list[dict]) -> tuple[dict, list[dict]]:
    """Medians over the rounds, and one row per protocol with the overheads in µs."""
    keys = (*PROTOCOLS, "floor", "run_back_to_back_us", "run_paced_us")
    med = {k: statistics.median(r[k] for r in rounds) for k in keys}
    rows = []
    for protocol in PROTOCOLS:
        p50_us = med[protocol] * 1e3
        rows.append(
            {
                "protocol": protocol,
                "p50_ms": round(med[protocol], 3),
                "overhead_us": round(p50_us - med["run_paced_us"]),
                "overhead_vs_back_to_back_us": round(p50_us - med["run_back_to_back_us"]),
                "above_floor_us": round(p50_us - med["floor"] * 1e3),
            }
        )
    return med, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="simple", help="an ONNX model of model_repository/")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)

    rounds: list[dict] = []
    with floor_server() as floor_url, despina([], "overhead") as served:
        http, grpc = served.url_for("http-binary"), served.url_for("grpc")
        for rnd in range(args.rounds):
            rounds.append(measure(http, grpc, floor_url, args.model, args.duration))
            print(f"round {rnd + 1}: {json.dumps(rounds[-1])}", flush=True)
    med, rows = summarize(rounds)
    print(
        f"\n{platform.processor() or platform.machine()}, nproc={os.cpu_count()}, "
        f"model {args.model}, {args.rounds} rounds of {args.duration:g} s, medians:"
    )
    print(
        f"InferenceSession.run in-process: {med['run_back_to_back_us']:.1f} us back to back, "
        f"{med['run_paced_us']:.1f} us paced; one-process floor p50 {med['floor']:.3f} ms"
    )
    print(
        "| protocol | p50 ms | overhead µs (paced run) | (back-to-back run) | above the floor µs |"
    )
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['protocol']} | {r['p50_ms']} | {r['overhead_us']} | "
            f"{r['overhead_vs_back_to_back_us']} | {r['above_floor_us']} |"
        )
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {"model": args.model, "rounds": rounds, "medians": med, "rows": rows}, indent=1
            )
        )


if __name__ == "__main__":
    main()
