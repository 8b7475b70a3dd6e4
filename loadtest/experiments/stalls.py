#!/usr/bin/env python3
"""What each stall attack of issue #12 costs other clients: one ``despina serve`` on the
shipped repository, two bystanders inferring ``simple`` back to back (raw HTTP binary and
raw gRPC, each in its own process), and each attack in turn, after a quiet baseline window.

    python loadtest/stalls.py [--rounds 3] [--only header,ping] [--out table.md]
        [--json-out raw.json] [--despina-ref REF]

Per attack it reports the attacker's answer, how long the attack took, and the
bystanders' p99 and worst latency over the requests that overlap the attack (and the
0.25 s after it), against the same over the baseline window just before. The target is
issue #12's "no stall over 100 ms for other clients": worst < 100 ms, median over rounds.
``json`` (a 32 MiB JSON body) is a known, documented stall (docs/security.md: JSON is
decoded on the frontend's loop), measured here, not a target. Attacks go only to
127.0.0.1 and are bounded in count and time; the server is always stopped.
"""

from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # local_despina, overhead
from local_despina import ROOT, Served, despina, despina_overlay  # noqa: E402

TARGET_MS = 100.0
TAIL_S = 0.25  # a stall may outlast the attacker's answer
INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
MiB = 1 << 20


# --- bystanders: each in its own process, so neither the attacker's GIL nor the other ---
# --- bystander's delays its timing (perf_counter is CLOCK_MONOTONIC, shared by all) ----


def simple_http_request(port: int) -> bytes:
    """A keep-alive binary-extension infer of ``simple`` (INT32 [1, 16] twice)."""
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
            "outputs": [
                {"name": name, "parameters": {"binary_data": True}}
                for name in ("OUTPUT0", "OUTPUT1")
            ],
        }
    ).encode()
    body = header + bytes(range(64)) * 2
    return (
        f"POST /v2/models/simple/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def simple_grpc_request() -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(bytes(range(64)))
    return request.SerializeToString()


def http_status(sock: socket.socket, buf: bytes) -> tuple[int, bytes]:
    """Read one response (Content-Length framed) from ``sock``; its status and what
    follows it in ``buf``."""
    data = bytearray(buf)
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        data += chunk
    end = data.index(b"\r\n\r\n") + 4
    head = bytes(data[:end])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(data) < end + length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed inside a body")
        data += chunk
    return int(head.split(None, 2)[1]), bytes(data[end + length :])


def http_bystander(port: int, ready, stop, out) -> None:
    request = simple_http_request(port)
    starts, ends, errors = array("d"), array("d"), 0
    sock, buf = None, b""
    while not stop.is_set():
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = b""
            t0 = time.perf_counter()
            sock.sendall(request)
            status, buf = http_status(sock, buf)
            t1 = time.perf_counter()
        except OSError:
            errors += 1
            sock = None
            time.sleep(0.01)
            continue
        if status != 200:
            errors += 1
            continue
        starts.append(t0)
        ends.append(t1)
        ready.set()
    out.send((starts.tobytes(), ends.tobytes(), errors))


def grpc_bystander(port: int, ready, stop, out) -> None:
    import grpc

    request = simple_grpc_request()
    starts, ends, errors = array("d"), array("d"), 0
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary(INFER_PATH)
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                infer(request, timeout=30)
            except grpc.RpcError:
                errors += 1
                time.sleep(0.01)
                continue
            starts.append(t0)
            ends.append(time.perf_counter())
            ready.set()
    out.send((starts.tobytes(), ends.tobytes(), errors))


class Bystanders:
    """Both bystanders, started and answered once when built; their samples after ``stop()``."""

    KINDS = {"http": http_bystander, "grpc": grpc_bystander}

    def __init__(self, served: Served) -> None:
        ctx = mp.get_context("spawn")
        self.stop_event = ctx.Event()
        self.procs: dict[str, tuple] = {}
        for kind, target in self.KINDS.items():
            port = served.http_port if kind == "http" else served.grpc_port
            ready, (recv, send) = ctx.Event(), ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=target, args=(port, ready, self.stop_event, send), daemon=True
            )
            proc.start()
            self.procs[kind] = (proc, ready, recv)
        for kind, (_, ready, _) in self.procs.items():
            if not ready.wait(60):
                raise SystemExit(f"the {kind} bystander never got an answer")

    def stop(self) -> dict[str, tuple[array, array, int]]:
        """Stops both; per kind, request start and end times and the error count."""
        self.stop_event.set()
        samples = {}
        for kind, (proc, _, recv) in self.procs.items():
            if recv.poll(60):
                raw_starts, raw_ends, errors = recv.recv()
                starts, ends = array("d"), array("d")
                starts.frombytes(raw_starts)
                ends.frombytes(raw_ends)
                samples[kind] = (starts, ends, errors)
            proc.join(10)
        return samples

    def kill(self) -> None:
        self.stop_event.set()
        for proc, _, _ in self.procs.values():
            proc.join(5)
            if proc.is_alive():
                proc.kill()


# --- a minimal raw HTTP/2 client: frames out, frames in, HPACK by the hpack package ------

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0, 1, 3, 4, 6, 7
END_STREAM, END_HEADERS = 0x1, 0x4
GOAWAY_NAMES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 0xB: "ENHANCE_YOUR_CALM"}
GRPC_CODES = {"0": "OK", "3": "INVALID_ARGUMENT", "8": "RESOURCE_EXHAUSTED", "13": "INTERNAL"}


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return n.to_bytes(3, "big") + bytes((kind, flags)) + sid.to_bytes(4, "big") + payload


def grpc_fields(extra=()) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", INFER_PATH),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra,
    ]


class RawH2:
    """One HTTP/2 connection after the client preface; no checks of its own."""

    def __init__(self, port: int) -> None:
        from hpack import Decoder, Encoder

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.encoder, self.decoder = Encoder(), Decoder()
        self.buf = b""
        self.closed = False
        self.goaway_code: int | None = None
        self.status: dict[int, str] = {}  # stream -> grpc-status
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0))

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def headers(self, sid: int, fields, huffman: bool = True, flags: int = END_HEADERS) -> bytes:
        return frame(HEADERS, flags, sid, self.encoder.encode(fields, huffman=huffman))

    def data(self, sid: int, payload: bytes) -> bytes:
        """``payload`` in DATA frames of at most 16 KiB, the last one ending the stream."""
        pieces = [payload[i : i + 16384] for i in range(0, len(payload), 16384)]
        return b"".join(
            frame(DATA, END_STREAM if i == len(pieces) - 1 else 0, sid, piece)
            for i, piece in enumerate(pieces)
        )

    def flood(self, unit: bytes, count: int, seconds: float = 5.0) -> None:
        """Send ``unit`` ``count`` times without reading, in 64 KiB writes, until done, the
        server closes, or it stops reading (back-pressure), at most ``seconds``."""
        chunk = memoryview(unit * max(1, (64 << 10) // len(unit)))
        total, sent, pos = count * len(unit), 0, 0  # pos: where in chunk the next byte is
        deadline = time.monotonic() + seconds
        self.sock.settimeout(0.5)
        while sent < total and time.monotonic() < deadline:
            try:
                n = self.sock.send(chunk[pos : pos + total - sent])
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                return
            sent, pos = sent + n, (pos + n) % len(chunk)

    def read_until(self, done: Callable[[], bool], seconds: float = 10.0) -> None:
        """Read and decode frames until ``done()``, the connection closes or time is up."""
        deadline = time.monotonic() + seconds
        while not done() and not self.closed and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 20)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            except TimeoutError:
                return
            if not chunk:
                self.closed = True
            self.buf += chunk
            while len(self.buf) >= 9 and len(self.buf) >= 9 + int.from_bytes(self.buf[:3], "big"):
                n = int.from_bytes(self.buf[:3], "big")
                kind, sid, payload = self.buf[3], int.from_bytes(self.buf[5:9], "big"), self.buf[9:]
                payload, self.buf = payload[:n], payload[n:]
                if kind == HEADERS:
                    fields = dict(self.decoder.decode(payload))
                    if "grpc-status" in fields:
                        self.status[sid] = fields["grpc-status"]
                elif kind == GOAWAY:
                    self.goaway_code = int.from_bytes(payload[4:8], "big")

    def goaway(self) -> str:
        self.read_until(lambda: self.closed)
        if self.goaway_code is None:
            return "no GOAWAY"
        return "GOAWAY " + GOAWAY_NAMES.get(self.goaway_code, hex(self.goaway_code))


def grpc_status_names(statuses: list[str | None]) -> str:
    """'RESOURCE_EXHAUSTED x64' from each stream's grpc-status (None: no answer)."""
    names = [GRPC_CODES.get(s, f"grpc-status {s}") if s else "no answer" for s in statuses]
    return ", ".join(
        f"{n} x{names.count(n)}" if len(names) > 1 else n for n in dict.fromkeys(names)
    )


# --- the attacks: prepare (outside any window) returns what run() sends; run() returns ---
# --- the server's answer to the attacker, in words ----------------------------------------


def http_connect(served: Served) -> socket.socket:
    return socket.create_connection(("127.0.0.1", served.http_port), timeout=10)


def header_run(served: Served, _: None) -> str:
    """A 16 MiB header value sent in 64 KiB pieces (the limit is 64 KiB)."""
    with http_connect(served) as sock:
        try:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
            piece = b"a" * 65536
            for _ in range(256):
                sock.sendall(piece)
        except OSError:
            pass  # refused while it was still sending
        return str(http_status(sock, b"")[0])


def announce(length: int) -> bytes:
    return (
        f"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
        "Inference-Header-Content-Length: 100\r\n\r\n"
    ).encode() + bytes(65536)


def bodies_run(served: Served, _: None) -> str:
    """4 connections announce 2 GB bodies and 4 announce 48 MiB (within the limit: the
    write-through path), each sending 64 KiB; the second four are held 0.3 s, then dropped."""
    socks = [http_connect(served) for _ in range(8)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(announce(2 * 1024**3 if i < 4 else 48 * MiB))
        refused = [str(http_status(sock, b"")[0]) for sock in socks[:4]]
        time.sleep(0.3)
        return f"{'/'.join(dict.fromkeys(refused))} x4; 48 MiB x4 held"
    finally:
        for sock in socks:
            sock.close()


def bytes_prepare() -> bytes:
    """8 M zero-length BYTES elements: two [1, 4 Mi] inputs of simple_string (dims [16])."""
    count = 4 << 20
    blob = bytes(4 * count)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": "BYTES",
                    "shape": [1, count],
                    "parameters": {"binary_data_size": len(blob)},
                }
                for name in ("INPUT0", "INPUT1")
            ]
        }
    ).encode()
    body = header + blob + blob
    return (
        "POST /v2/models/simple_string/infer HTTP/1.1\r\nHost: x\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def post_run(served: Served, request: bytes) -> str:
    with http_connect(served) as sock:
        sock.settimeout(60)
        sock.sendall(request)
        return str(http_status(sock, b"")[0])


def bomb(inflated: int) -> bytes:
    """A deflate gRPC message of ``inflated`` zeros (64 MiB: 65 KB)."""
    deflated = zlib.compress(bytes(inflated), 9)
    return b"\x01" + len(deflated).to_bytes(4, "big") + deflated


def bomb_run(served: Served, message: bytes) -> str:
    """A compressed ModelInfer message on raw HTTP/2 (grpc-encoding deflate)."""
    with RawH2(served.grpc_port) as c:
        fields = grpc_fields([("grpc-encoding", "deflate")])
        c.sock.sendall(c.headers(1, fields) + c.data(1, message))
        c.read_until(lambda: 1 in c.status)
        return grpc_status_names([c.status.get(1)])


def zeros_run(served: Served, message: bytes) -> str:
    """64 MiB of zeros as a ModelInfer message (uncompressed), by grpc's own client."""
    import grpc

    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}", options=options) as channel:
        try:
            channel.unary_unary(INFER_PATH)(message, timeout=30)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def ping_run(served: Served, _: None) -> str:
    """200,000 PING frames from a client that never reads."""
    with RawH2(served.grpc_port) as c:
        c.flood(frame(PING, 0, 0, b"12345678"), 200_000)
        return c.goaway()


def hpack_run(served: Served, _: None) -> str:
    """64 distinct 24 KB header blocks that leave HPACK's dynamic table alone."""
    from hpack import NeverIndexedHeaderTuple

    with RawH2(served.grpc_port) as c:
        for i in range(64):
            pad = NeverIndexedHeaderTuple("x-pad", f"{i:024000d}")
            flags = END_HEADERS | END_STREAM
            c.sock.sendall(c.headers(2 * i + 1, [*grpc_fields(), pad], False, flags))
        c.read_until(lambda: len(c.status) >= 64)
        return grpc_status_names([c.status.get(2 * i + 1) for i in range(64)])


def reset_run(served: Served, request: bytes) -> str:
    """Rapid reset (CVE-2023-44487): 5,000 HEADERS + DATA + RST_STREAM(CANCEL) triples."""
    message = b"\x00" + len(request).to_bytes(4, "big") + request
    with RawH2(served.grpc_port) as c:
        triples = b"".join(
            c.headers(sid, grpc_fields())
            + frame(DATA, END_STREAM, sid, message)
            + frame(RST_STREAM, 0, sid, (8).to_bytes(4, "big"))
            for sid in range(1, 10_001, 2)
        )
        c.flood(triples, 1)
        return c.goaway()


def json_prepare() -> bytes:
    """One FP32 [1, 16 Mi] tensor of JSON numbers (32 MiB) to identity_fp32; binary output,
    so only the request's decoding is JSON."""
    count = 16 << 20
    body = (
        b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,%d],"data":[' % count
        + b"0," * (count - 1)
        + b'0]}],"outputs":[{"name":"OUTPUT0","parameters":{"binary_data":true}}]}'
    )
    return (
        "POST /v2/models/identity_fp32/infer HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@dataclass(frozen=True)
class Attack:
    name: str
    title: str
    run: Callable[[Served, object], str]
    prepare: Callable[[], object] = lambda: None
    known: bool = False  # a documented stall, measured, not a target


ATTACKS = [
    Attack("header", "HTTP: 16 MiB header value in 64 KiB pieces", header_run),
    Attack("bodies", "HTTP: 4 x 2 GB and 4 x 48 MiB bodies announced, 64 KiB sent", bodies_run),
    Attack("bytes", "HTTP: 8 M zero-length BYTES elements (32 MiB)", post_run, bytes_prepare),
    Attack(
        "bomb",
        "gRPC: 65 KB deflate of 64 MiB of zeros (the limit)",
        bomb_run,
        lambda: bomb(64 * MiB),
    ),
    Attack(
        "bomb-over",
        "gRPC: 65 KB deflate of 65 MiB of zeros (over the limit)",
        bomb_run,
        lambda: bomb(65 * MiB),
    ),
    Attack("zeros", "gRPC: 64 MiB of zeros as ModelInfer", zeros_run, lambda: bytes(64 * MiB)),
    Attack("ping", "HTTP/2: 200,000 PINGs, never read", ping_run),
    Attack("hpack", "HTTP/2: 64 distinct 24 KB header blocks", hpack_run),
    Attack("reset", "HTTP/2: rapid reset, 5,000 calls", reset_run, simple_grpc_request),
    Attack("json", "HTTP JSON: 32 MiB body (16 M numbers)", post_run, json_prepare, known=True),
]


# --- measuring ------------------------------------------------------------------------------


def p99(values: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * 99 // 100) - 1)]


def latencies_ms(
    samples: tuple[array, array, int], start: float, end: float, overlap: bool
) -> list[float]:
    """Latencies in ms of the requests that overlap [start, end] (``overlap``: a stall
    shows in the request it delays, whenever that began), or lie wholly inside it (a
    baseline must not count the request that the attack right after it delays). A
    bystander's requests follow each other, so its start and end times are both sorted."""
    starts, ends, _ = samples
    if overlap:
        first, last = bisect.bisect_left(ends, start), bisect.bisect_right(starts, end)
    else:
        first, last = bisect.bisect_left(starts, start), bisect.bisect_right(ends, end)
    return [(ends[i] - starts[i]) * 1e3 for i in range(first, last)]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_rounds(
    served: Served, attacks: list[Attack], rounds: int, baseline_s: float
) -> tuple[list[dict], dict[str, int]]:
    """Every attack once per round, each after a baseline window: one record per attack
    and round (the windows' bounds, then the bystanders' figures in them), and each
    bystander's error count."""
    records = []
    bystanders = Bystanders(served)
    try:
        for round_no in range(1, rounds + 1):
            for attack in attacks:
                payload = attack.prepare()
                t0 = time.perf_counter()
                time.sleep(baseline_s)
                t1 = time.perf_counter()
                try:
                    answer = attack.run(served, payload)
                except Exception as exc:  # reported in the table, the run goes on
                    answer = f"failed: {exc!r}"
                t2 = time.perf_counter()
                del payload
                time.sleep(TAIL_S)
                records.append(
                    {
                        "round": round_no,
                        "attack": attack.name,
                        "answer": answer,
                        "baseline": (t0, t1),
                        "attack_window": (t1, t2 + TAIL_S),
                        "attack_s": t2 - t1,
                    }
                )
                print(f"round {round_no} {attack.name}: {answer} in {t2 - t1:.2f} s", flush=True)
        samples = bystanders.stop()
    finally:
        bystanders.kill()
    for record in records:
        for kind, sample in samples.items():
            for window in ("baseline", "attack_window"):
                lat = latencies_ms(sample, *record[window], window == "attack_window")
                record[f"{kind}_{window}"] = {
                    "n": len(lat),
                    "p99_ms": p99(lat) if lat else None,
                    "worst_ms": max(lat) if lat else None,
                }
    errors = {kind: sample[2] for kind, sample in samples.items()}
    return records, errors


def fmt(ms: float | None) -> str:
    if ms is None or ms != ms:
        return "-"
    return f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"


def table(attacks: list[Attack], records: list[dict]) -> list[str]:
    """One markdown row per attack: medians over rounds."""
    lines = [
        "| attack | attacker's answer | attack s | HTTP p99 / worst ms | gRPC p99 / worst ms "
        "| baseline p99 / worst ms | target: worst < 100 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for attack in attacks:
        mine = [r for r in records if r["attack"] == attack.name]

        def med(key: str, window: str, stat: str, mine=mine) -> float:
            values = [r[f"{key}_{window}"][stat] for r in mine]
            return median([v for v in values if v is not None])

        during = {
            k: (med(k, "attack_window", "p99_ms"), med(k, "attack_window", "worst_ms"))
            for k in ("http", "grpc")
        }
        base_p99 = max(med(k, "baseline", "p99_ms") for k in ("http", "grpc"))
        base_worst = max(med(k, "baseline", "worst_ms") for k in ("http", "grpc"))
        worst = max(during["http"][1], during["grpc"][1])
        if attack.known:
            verdict = "known"
        else:
            verdict = "met" if worst < TARGET_MS else "**not met**"
        answers = " / ".join(dict.fromkeys(r["answer"] for r in mine))
        lines.append(
            f"| `{attack.name}` {attack.title} | {answers} "
            f"| {median([r['attack_s'] for r in mine]):.2f} "
            f"| {fmt(during['http'][0])} / {fmt(during['http'][1])} "
            f"| {fmt(during['grpc'][0])} / {fmt(during['grpc'][1])} "
            f"| {fmt(base_p99)} / {fmt(base_worst)} | {verdict} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--only", help="comma-separated attack names: " + ",".join(a.name for a in ATTACKS)
    )
    parser.add_argument("--baseline-s", type=float, default=2.0, help="quiet window per attack")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--json-out", help="write every round's raw figures to this file")
    parser.add_argument("--despina-ref", help="serve git REF's code instead of the working tree")
    args = parser.parse_args(argv)
    attacks = ATTACKS
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {a.name for a in ATTACKS}
        if unknown:
            parser.error(f"unknown attacks: {', '.join(sorted(unknown))}")
        attacks = [a for a in ATTACKS if a.name in names]

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    with tempfile.TemporaryDirectory(prefix="stalls-") as tmp:
        env, code = None, "the working tree"
        if args.despina_ref:
            env = {**os.environ, "PYTHONPATH": despina_overlay(args.despina_ref, Path(tmp))}
            code = (
                "git "
                + subprocess.run(
                    ["git", "-C", str(ROOT), "rev-parse", "--short", args.despina_ref],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.strip()
            )
        with despina([], "stalls", env=env) as served:
            records, errors = run_rounds(served, attacks, args.rounds, args.baseline_s)
    os.unlink(served.log)
    lines = [
        f"{started}, Despina {code}, nproc={os.cpu_count()}, {args.rounds} round(s), "
        "medians over rounds; "
        f"bystander errors: http={errors.get('http')} grpc={errors.get('grpc')}",
        "",
        *table(attacks, records),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    if args.json_out:
        raw = {
            "started": started,
            "despina": code,
            "rounds": args.rounds,
            "errors": errors,
            "records": records,
        }
        Path(args.json_out).write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    main()
