#!/usr/bin/env python3
"""The inline threshold, measured: at which tensor size do shared-memory refs between
Despina's processes stop being slower than carrying the bytes inline on the socket?

    python loadtest/inline_threshold.py [--sizes-kib 4,16,...,4096]
        [--thresholds-kib 16,64,256,1024,inf] [--rounds 3] [-d 1.5] [--warmup 0.5]
        [--models identity[,identity_fp32]] [--c4-thresholds-kib 16,inf]

A tensor of at least ``--inline-threshold`` bytes is written into the sender's arena and
travels as a ``Shm`` ref (inputs: the frontend's arena; outputs: the backend host's);
a smaller one rides the unix socket as a frame. The script starts one ``despina serve
--inline-threshold T`` per threshold, all at once on their own ports (an idle server
costs no CPU, and no restart lands between the thresholds it compares), on the shipped
repository plus a generated one holding compare's Python-backend ``identity`` (FP32
[-1], the model the comparison with Triton uses). Then, for ``--rounds`` rounds, for
each size and protocol (HTTP binary, gRPC), it drives every server in turn with
loadtest/perf.py at c=1, and also at c=4 for the servers of ``--c4-thresholds-kib``
(the all-refs and all-inline ends; the middle thresholds repeat one of them at any
size), starting each round at the next server so that no threshold always runs first.

For a given size every threshold at or below it means refs and every one above it means
inline, so cells of one row that share a mode measure the same path on different
servers: their spread is the noise. The verdict compares the two ends, measured back to
back in each round: per size, the median over the rounds of the lowest threshold's
infer/s (refs from that size up) over the highest's (inline). The suggested default is
the smallest measured size from which up, at every size, protocol and concurrency, that
ratio is at least ``1 - --tolerance``.

Prints one table per protocol and concurrency (rows: size, columns: threshold, cells:
median p50 ms and infer/s over the rounds) and writes
``loadtest/results/raw/inline-threshold-<timestamp>.{md,csv}`` (medians) and ``.json`` (every
run). Only same-run comparisons mean anything on a small shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import importlib.machinery
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # local_despina, overhead
from local_despina import despina  # noqa: E402

from despina.services.perf import cli as perf  # noqa: E402

HERE = Path(__file__).resolve().parents[1]  # loadtest/
RESULTS = HERE / "results" / "raw"
PROTOCOLS = ("http-binary", "grpc")
INFINITE = 1 << 40  # larger than any tensor: everything travels inline
KiB = 1024
FP32_BYTES = 4


def load_compare():
    """loadtest/compare (a script without the .py suffix), for its identity model."""
    loader = importlib.machinery.SourceFileLoader("despina_compare", str(HERE / "compare"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def write_identity_repository(root: Path) -> Path:
    compare = load_compare()
    model = root / "identity"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(compare.IDENTITY_CONFIG)
    (model / "1" / "model.py").write_text(compare.IDENTITY_MODEL)
    return root


def parse_kib(text: str) -> list[int]:
    """``16,64,inf`` -> bytes; ``inf`` is INFINITE."""
    return [INFINITE if x.strip() == "inf" else int(x) * KiB for x in text.split(",")]


def label(nbytes: int) -> str:
    if nbytes >= INFINITE:
        return "inf"
    if nbytes >= 1 << 20 and nbytes % (1 << 20) == 0:
        return f"{nbytes >> 20} MiB"
    return f"{nbytes // KiB} KiB"


def measure(url: str, model: str, protocol: str, size: int, levels: list[int], args) -> list:
    """One perf.py call: a record per concurrency level (empty when the run failed)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        code = perf.main(
            [
                "--url",
                url,
                "--model",
                model,
                "--protocol",
                protocol,
                "--sweep",
                ",".join(map(str, levels)),
                "-d",
                str(args.duration),
                "--warmup",
                str(args.warmup),
                "--shape-override",
                str(size // FP32_BYTES),
                "--json-out",
                out.name,
            ]
        )
        if code != 0:
            return []
        return json.loads(Path(out.name).read_text())["runs"]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> list[dict]:
    """One row per cell (model, protocol, concurrency, size, threshold): medians over the
    rounds."""
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (r["model"], r["protocol"], r["concurrency"], r["size_bytes"], r["threshold"])
        cells.setdefault(key, []).append(r)
    rows = []
    for (model, protocol, conc, size, threshold), same in sorted(cells.items()):
        rows.append(
            {
                "model": model,
                "protocol": protocol,
                "concurrency": conc,
                "size_bytes": size,
                "threshold_bytes": threshold if threshold < INFINITE else "inf",
                "mode": "refs" if threshold <= size else "inline",
                "rounds": len(same),
                "infer_per_s": median([r["infer_per_s"] for r in same]),
                "p50_ms": median([r["p50_ms"] for r in same]),
                "mb_per_s": median([r["mb_per_s"] for r in same]),
                "errors": sum(r["errors"] for r in same),
            }
        )
    return rows


def ratios(runs: list[dict], thresholds: list[int]) -> dict:
    """(model, protocol, concurrency, size) -> the median over the rounds of the infer/s
    of the lowest threshold's server (refs from that size up) over the highest one's (the
    most inline): each round's pair ran back to back. Sizes below the lowest threshold,
    inline on both, have none."""
    low, high = min(thresholds), max(thresholds)
    ends: dict[tuple, dict[int, dict[int, float]]] = {}
    for r in runs:
        if r["threshold"] in (low, high) and r["size_bytes"] >= low:
            key = (r["model"], r["protocol"], r["concurrency"], r["size_bytes"])
            ends.setdefault(key, {}).setdefault(r["round"], {})[r["threshold"]] = r["infer_per_s"]
    out = {}
    for key, rounds in ends.items():
        pairs = [v[low] / v[high] for v in rounds.values() if low in v and high in v and v[high]]
        out[key] = statistics.median(pairs) if pairs else None
    return out


def suggest(ratio: dict, sizes: list[int], tolerance: float) -> dict:
    """Per model: the smallest measured size from which up, at every size, protocol and
    concurrency, refs reached at least ``1 - tolerance`` of inline's infer/s (INFINITE
    when none)."""
    chosen = {}
    for model in sorted({k[0] for k in ratio}):
        chosen[model] = INFINITE
        for size in sorted(sizes, reverse=True):
            found = [r for k, r in ratio.items() if k[0] == model and k[3] == size]
            if not found or any(r is None or r < 1 - tolerance for r in found):
                break
            chosen[model] = size
    return chosen


def tables(rows: list[dict], ratio: dict, thresholds: list[int]) -> list[str]:
    cells = {
        (r["model"], r["protocol"], r["concurrency"], r["size_bytes"], r["threshold_bytes"]): r
        for r in rows
    }
    low, high = label(min(thresholds)), label(max(thresholds))
    lines = []
    for model, protocol, conc in sorted(
        {(r["model"], r["protocol"], r["concurrency"]) for r in rows},
        key=lambda k: (k[0], k[2], PROTOCOLS.index(k[1])),
    ):
        heads = [label(t) for t in thresholds]
        lines += [
            f"### {model}, {protocol}, c={conc}: median p50 ms / infer/s (r = refs, i = inline)",
            "",
            "| size | " + " | ".join(heads) + f" | infer/s {low} / {high} |",
            "|---" * (len(heads) + 2) + "|",
        ]
        for size in sorted({r["size_bytes"] for r in rows}):
            row = [label(size)]
            for t in thresholds:
                c = cells.get((model, protocol, conc, size, t if t < INFINITE else "inf"))
                if c is None or c["infer_per_s"] is None:
                    row.append("")
                else:
                    row.append(f"{c['p50_ms']:.2f} / {c['infer_per_s']:.0f} {c['mode'][0]}")
            r = ratio.get((model, protocol, conc, size))
            row.append(f"{r:.2f}" if r is not None else "both inline")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-kib", default="4,16,32,64,128,256,512,1024,4096")
    parser.add_argument("--thresholds-kib", default="16,64,256,1024,inf")
    parser.add_argument(
        "--c4-thresholds-kib",
        default="16,inf",
        help="the servers also measured at c=4 (empty: none)",
    )
    parser.add_argument("--models", default="identity", help="identity and/or identity_fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-d", "--duration", type=float, default=1.5)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--tag", default="", help="appended to the result file names")
    args = parser.parse_args(argv)
    sizes = [s for s in parse_kib(args.sizes_kib) if s < INFINITE]
    thresholds = parse_kib(args.thresholds_kib)
    with_c4 = set(parse_kib(args.c4_thresholds_kib)) if args.c4_thresholds_kib else set()
    models = [m.strip() for m in args.models.split(",")]
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    runs: list[dict] = []
    with (
        tempfile.TemporaryDirectory(prefix="despina-inline-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        repo = write_identity_repository(Path(tmp))
        servers = {
            t: stack.enter_context(
                despina(
                    [f"--model-repository={repo}", f"--inline-threshold={t}"],
                    f"inline-{label(t).replace(' ', '')}",
                )
            )
            for t in thresholds
        }
        print(f"# {len(servers)} servers ready in {time.monotonic() - started:.0f}s", flush=True)
        for rnd in range(args.rounds):
            for model in models:
                for size in sizes:
                    for protocol in PROTOCOLS:
                        shift = (rnd + sizes.index(size)) % len(thresholds)
                        for t in thresholds[shift:] + thresholds[:shift]:
                            served = servers[t]
                            url = (
                                f"127.0.0.1:{served.grpc_port}"
                                if protocol == "grpc"
                                else f"http://127.0.0.1:{served.http_port}"
                            )
                            levels = [1, 4] if t in with_c4 else [1]
                            for run in measure(url, model, protocol, size, levels, args):
                                run.update(round=rnd, size_bytes=size, threshold=t)
                                runs.append(run)
            print(
                f"# round {rnd + 1}/{args.rounds} done at {time.monotonic() - started:.0f}s",
                flush=True,
            )
    if not runs:
        print("no run succeeded; see the perf.py errors above", file=sys.stderr)
        return 1
    rows = summarize(runs)
    ratio = ratios(runs, thresholds)
    chosen = suggest(ratio, sizes, args.tolerance)
    head = (
        f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}  "
        f"{platform.processor() or platform.machine()}  nproc={os.cpu_count()}  "
        f"rounds={args.rounds} window={args.duration}s warm-up={args.warmup}s  "
        f"took {time.monotonic() - started:.0f}s"
    )
    lines = [head, "", *tables(rows, ratio, thresholds)]
    for model, t in chosen.items():
        lines.append(
            f"suggested threshold for {model}: {label(t)} (from this size up, refs reached at "
            f"least {1 - args.tolerance:.0%} of inline's infer/s at every size, protocol and "
            "concurrency measured)"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"inline-threshold-{stamp}{'-' + args.tag if args.tag else ''}"
    base.with_suffix(".md").write_text(text)
    with open(base.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0].keys(), "low_over_high_infer_per_s"])
        writer.writeheader()
        for r in rows:
            key = (r["model"], r["protocol"], r["concurrency"], r["size_bytes"])
            ratio_value = ratio.get(key)
            writer.writerow(
                {
                    **r,
                    "low_over_high_infer_per_s": round(ratio_value, 3)
                    if ratio_value is not None
                    else "",
                }
            )
    base.with_suffix(".json").write_text(json.dumps(runs, indent=1, default=str) + "\n")
    print(f"wrote {base}.md, .csv and .json (every run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
