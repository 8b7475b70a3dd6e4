"""Does adding a backend host add capacity? Throughput of a compute-bound ONNX model served
by ``despina serve --backend-hosts onnxruntime=N`` for N = 1, 2, 3 (#17).

The model (built here with the onnx helpers, into a temporary repository) is a chain of
MatMul+Relu layers on a FP32 [rows, width] input, one instance per host, ONNX Runtime
limited to one intra-op thread (Triton's ``intra_op_thread_count`` parameter) so that an
instance uses one core: with the per-host placement each host loads its own instance,
and the frontends spread requests over them. All arms serve at once and are driven in
turn (interleaved rounds, so a slow minute of the machine hits each arm alike) by
``despina perf`` at a concurrency that keeps every instance busy; the table gives the
median over the rounds of infer/s, p50, and the server's CPU (every process of the arm)
per inference, infer/s against one host, the best round, and the CPU the machine spent
on other people's work meanwhile (a shared machine: rounds it disturbed show there); each
round also prints how the backend hosts' CPU split between them (the load is spread when
each has its share, whatever the machine's noise).

    .venv/bin/python loadtest/capacity.py                     # 1, 2, 3 hosts; 3 rounds
    .venv/bin/python loadtest/capacity.py --hosts 1,2,4 --rounds 5 --out results/raw/x.txt

Expect the gain to stop at the machine's free cores: on 2 vCPUs one host keeps one core
busy, two use what the load generator, the frontend and the scheduler leave of the second
(about 1.6x), and a third only shares the same cores (loadtest/README.md#capacity-backend-
hosts-that-add-throughput).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_despina import free_port, perf_run, proc_stat_busy, steal_meter  # noqa: E402

MODEL = "matmul_chain"
CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {rows}, {width} ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {rows}, {width} ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
parameters {{ key: "inter_op_thread_count" value: {{ string_value: "1" }} }}
"""


def build_model(root: Path, rows: int, width: int, layers: int) -> None:
    """``root/matmul_chain``: ``layers`` times Relu(X @ W_i), W_i random [width, width]
    scaled to keep the values bounded; its config.pbtxt as CONFIG says."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev = "INPUT0"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        out = "OUTPUT0" if i == layers - 1 else f"R{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"M{i}"]))
        nodes.append(helper.make_node("Relu", [f"M{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        MODEL,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [rows, width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [rows, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    (root / MODEL / "1").mkdir(parents=True)
    onnx.save(model, str(root / MODEL / "1" / "model.onnx"))
    (root / MODEL / "config.pbtxt").write_text(CONFIG.format(name=MODEL, rows=rows, width=width))


@contextlib.contextmanager
def serve(repository: Path, hosts: int, log_dir: Path, timeout: float = 90.0) -> Iterator[dict]:
    """``despina serve`` of ``repository`` with ``hosts`` ONNX Runtime hosts until the
    block ends: {"pid", "url", "log"}. SystemExit (with the log's name) if the model is
    never ready; the server is stopped on every path."""
    http = free_port()
    log_path = log_dir / f"serve-{hosts}-hosts.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "despina.services.cli",
            "serve",
            f"--model-repository={repository}",
            f"--http-port={http}",
            f"--grpc-port={free_port()}",
            f"--metrics-port={free_port()}",
            f"--backend-hosts=onnxruntime={hosts}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{http}/v2/models/{MODEL}/ready"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{hosts} host(s): {MODEL} never ready; log in {log_path}")
            time.sleep(0.1)
        yield {"pid": proc.pid, "url": f"http://127.0.0.1:{http}", "log": log_path}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def host_cpu_s(pgid: int) -> dict[int, float]:
    """CPU seconds of each backend host process of the server in process group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"despina.services.backend_host" not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            found[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    return found


def group_cpu_s(pgids: set[int]) -> float:
    """CPU seconds (user + system) of the live processes in the process groups ``pgids``
    (each ``serve`` runs in its own session, its children with it)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in pgids:  # pgrp; utime, stime are fields 11, 12 after ")"
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def others_meter(pgids: set[int]) -> Iterator[dict]:
    """Measures the block: afterwards ``meter["others_cores"]`` holds the CPU (in cores)
    the machine spent on anything but the servers of ``pgids`` and this process's
    children (the load generator): other people's work on a shared machine."""
    meter: dict = {}
    busy0, ours0 = proc_stat_busy()[0], group_cpu_s(pgids)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        yield meter
    finally:
        busy1, ours1 = proc_stat_busy()[0], group_cpu_s(pgids)
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        kids = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
        others = (busy1 - busy0) - (ours1 - ours0) - kids
        meter["others_cores"] = round(max(0.0, others) / (time.perf_counter() - t0), 2)


def loaded_hosts(log_path: Path) -> int:
    """How many backend hosts logged loading the model (per-host placement: all)."""
    return log_path.read_text(errors="replace").count(f"despina.backend_host] loaded '{MODEL}'")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="1,2,3", help="comma list of host counts")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--protocol", default="http-binary")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", help="also write every line to this file")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.1,
        help="a round is undisturbed when others' load stays under this many cores",
    )
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.hosts.split(",")]
    out = open(args.out, "w") if args.out else None  # noqa: SIM115

    def say(line: str) -> None:
        print(line, flush=True)
        if out is not None:
            out.write(line + "\n")
            out.flush()

    say(
        f"# {time.strftime('%Y-%m-%d %H:%M')} capacity.py {' '.join(argv or sys.argv[1:])} "
        f"(nproc={os.cpu_count()}; model {args.layers} x MatMul+Relu on "
        f"[{args.rows}, {args.width}] FP32, 1 intra-op thread per instance)"
    )
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="despina-capacity-")))
        build_model(tmp / "repo", args.rows, args.width, args.layers)
        served = {n: stack.enter_context(serve(tmp / "repo", n, tmp)) for n in counts}
        for n, srv in served.items():
            deadline = time.monotonic() + 30
            while loaded_hosts(srv["log"]) < n and time.monotonic() < deadline:
                time.sleep(0.2)
            say(f"{n} host(s): {loaded_hosts(srv['log'])} loaded {MODEL}")
        pgids = {srv["pid"] for srv in served.values()}
        for rnd in range(1, args.rounds + 1):
            for n, srv in served.items():
                hosts0 = host_cpu_s(srv["pid"])
                try:
                    with steal_meter() as meter, others_meter(pgids) as others:
                        rec = perf_run(
                            srv["url"],
                            MODEL,
                            args.protocol,
                            args.concurrency,
                            args.duration,
                            args.warmup,
                            "--server-pid",
                            str(srv["pid"]),
                        )
                except subprocess.CalledProcessError as exc:
                    raise SystemExit(f"despina perf failed ({n} hosts):\n{exc.stderr}") from None
                rec.update(meter)
                rec.update(others)
                hosts1 = host_cpu_s(srv["pid"])
                used = sorted((hosts1[p] - hosts0.get(p, 0.0) for p in hosts1), reverse=True)
                rec["host_split"] = "/".join(f"{100 * u / (sum(used) or 1):.0f}" for u in used)
                requests = rec["requests"]
                rec["server_us"] = rec["server_cpu_s"] / requests * 1e6 if requests else 0.0
                runs[n].append(rec)
                say(
                    f"round={rnd} hosts={n} infer/s={rec['infer_per_s']:.0f} "
                    f"p50={rec['p50_ms']:.2f} ms errors={rec['errors']} "
                    f"server_cpu={rec['server_us']:.0f}us/infer steal={rec['steal_cores']:.2f} "
                    f"others={rec['others_cores']:.2f} cores hosts' CPU %={rec['host_split']}"
                )
    base = statistics.median(r["infer_per_s"] for r in runs[counts[0]])
    say(
        f"\n## medians of {args.rounds} rounds, {args.protocol} c={args.concurrency}; "
        f"ratio: infer/s against {counts[0]} host(s)"
    )
    say(
        "| backend hosts | infer/s | p50 ms | server CPU µs/infer | ratio | best round infer/s "
        "| others' load, cores |"
    )
    say("| --- | --- | --- | --- | --- | --- | --- |")
    for n in counts:
        recs = runs[n]
        ips = statistics.median(r["infer_per_s"] for r in recs)
        say(
            f"| {n} | {ips:,.0f} | {statistics.median(r['p50_ms'] for r in recs):.2f} | "
            f"{statistics.median(r['server_us'] for r in recs):,.0f} | {ips / base:.2f} | "
            f"{max(r['infer_per_s'] for r in recs):,.0f} | "
            f"{statistics.median(r['others_cores'] for r in recs):.2f} |"
        )
    quiet = {n: [r for r in runs[n] if r["others_cores"] < args.quiet] for n in counts}
    if all(quiet.values()):
        base = statistics.median(r["infer_per_s"] for r in quiet[counts[0]])
        say(
            f"\n## medians of the rounds others' load stayed under {args.quiet} cores (undisturbed)"
        )
        say("| backend hosts | rounds | infer/s | p50 ms | server CPU µs/infer | ratio |")
        say("| --- | --- | --- | --- | --- | --- |")
        for n in counts:
            recs = quiet[n]
            ips = statistics.median(r["infer_per_s"] for r in recs)
            say(
                f"| {n} | {len(recs)} | {ips:,.0f} | "
                f"{statistics.median(r['p50_ms'] for r in recs):.2f} | "
                f"{statistics.median(r['server_us'] for r in recs):,.0f} | {ips / base:.2f} |"
            )
    else:
        say(f"\n(no undisturbed table: some arm had no round with others under {args.quiet} cores)")
    if out is not None:
        out.close()


if __name__ == "__main__":
    main()
