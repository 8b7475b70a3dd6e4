"""One run's record from an engine's raw latencies: infer/s, percentiles, errors and CPU;
its one-line summary, CSV rows and a latency-throughput plot (matplotlib, the ``loadtest``
extra)."""

from __future__ import annotations

import csv
import math

import numpy as np

from despina.services.perf.target import PERCENTILES

# ---------------------------------------------------------------------------------------
# Reporting and the command line
# ---------------------------------------------------------------------------------------

CSV_FIELDS = (
    "label",
    "model",
    "protocol",
    "engine",
    "mode",
    "concurrency",
    "target_rate",
    "processes",
    "window_s",
    "requests",
    "infer_per_s",
    "mb_per_s",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "mean_ms",
    "errors",
    "warmup_errors",
    "unsent",
    "client_cpu_s",
    "client_cpu_us_per_infer",
    "server_cpu_s",
)


def combine_workers(results: list[dict], server_cpu_s: float | None) -> dict:
    """One run's record from its worker processes' results (each: ``latencies`` as int64
    bytes, its window, errors, CPU, unsent requests); ``server_cpu_s``: the server's CPU
    over the window, None when not measured. Both engines' workers report this shape."""
    latencies = np.concatenate([np.frombuffer(r["latencies"], dtype=np.int64) for r in results])
    first_errors = [r["first_error"] for r in results if r["first_error"]]
    return {
        "requests": int(latencies.size),
        "window_s": sum(r["window_ns"] for r in results) / len(results) / 1e9,
        "infer_per_s": sum(len(r["latencies"]) / 8 / (r["window_ns"] / 1e9) for r in results),
        "latency_ns": latencies,
        "errors": sum(r["errors"] for r in results),
        "warmup_errors": sum(r["warmup_errors"] for r in results),
        "first_error": first_errors[0] if first_errors else None,
        "client_cpu_user_s": sum(r["cpu_user_s"] for r in results),
        "client_cpu_sys_s": sum(r["cpu_sys_s"] for r in results),
        "server_cpu_s": server_cpu_s,
        "unsent": sum(r["unsent"] for r in results),
    }


def summarize(
    raw: dict,
    protocol: str,
    engine: str,
    concurrency: int,
    processes: int,
    rate: float = 0.0,
    request_tensor_bytes: int = 0,
) -> dict:
    """A flat result record: what the printed line shows, plus a few extras."""
    if raw["latency_ns"] is not None:
        lat = np.sort(raw["latency_ns"])
        pct = {
            p: (float(lat[max(0, math.ceil(p / 100 * lat.size) - 1)]) / 1e6 if lat.size else None)
            for p in PERCENTILES
        }
        mean = float(lat.mean()) / 1e6 if lat.size else None
    else:
        pct, mean = raw["percentiles_ms"], None
    requests = raw["requests"]
    cpu = raw["client_cpu_user_s"] + raw["client_cpu_sys_s"]
    record = {
        "protocol": protocol,
        "engine": engine,
        "mode": "rate" if rate else "closed",
        "concurrency": concurrency,
        "target_rate": rate or None,
        "processes": processes,
        "window_s": round(raw["window_s"], 3),
        "requests": requests,
        "infer_per_s": round(raw["infer_per_s"], 1),
        # input tensor bytes per second, counted once (MB = 10^6 bytes)
        "mb_per_s": round(raw["infer_per_s"] * request_tensor_bytes / 1e6, 1),
        **{f"p{p}_ms": (round(v, 3) if v is not None else None) for p, v in pct.items()},
        "mean_ms": round(mean, 3) if mean is not None else None,
        "errors": raw["errors"],
        "warmup_errors": raw["warmup_errors"],
        "unsent": raw.get("unsent"),
        "client_cpu_s": round(cpu, 3),
        "client_cpu_user_s": round(raw["client_cpu_user_s"], 3),
        "client_cpu_sys_s": round(raw["client_cpu_sys_s"], 3),
        "client_cpu_us_per_infer": round(cpu / requests * 1e6, 1) if requests else None,
        "server_cpu_s": (
            round(raw["server_cpu_s"], 3) if raw["server_cpu_s"] is not None else None
        ),
        "first_error": raw["first_error"],
    }
    return record


def format_line(r: dict) -> str:
    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    level = (
        f"rate={r['target_rate']:g} c={r['concurrency']}"
        if r.get("mode") == "rate"
        else f"c={r['concurrency']}"
    )
    line = (
        f"{r['protocol']} {level} infer/s={r['infer_per_s']:.1f}"
        f" p50={ms(r['p50_ms'])} p90={ms(r['p90_ms'])} p95={ms(r['p95_ms'])}"
        f" p99={ms(r['p99_ms'])} ms errors={r['errors']}"
        f" client_cpu={r['client_cpu_s']:.2f}s"
    )
    if r["client_cpu_us_per_infer"] is not None:
        line += f" ({r['client_cpu_us_per_infer']:.1f}us/infer)"
    if r["server_cpu_s"] is not None:
        line += f" server_cpu={r['server_cpu_s']:.2f}s"
    if r.get("mb_per_s") and r["mb_per_s"] >= 1:
        line += f" MB/s={r['mb_per_s']:.1f}"
    if r.get("unsent"):
        line += f" unsent={r['unsent']}"
    return line


def write_csv(records: list[dict], path: str) -> None:
    """One row per run; the columns are CSV_FIELDS (missing values are empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def plot_latency_throughput(
    series: dict[str, list[dict]], path: str, title: str = "latency vs throughput"
) -> None:
    """A PNG: p50 (solid) and p99 (dashed) latency against achieved infer/s, one colour per
    series (e.g. per server), each point labelled with its concurrency or rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, records) in enumerate(series.items()):
        records = [r for r in records if r.get("p50_ms") is not None]
        if not records:
            continue
        colour = f"C{i}"
        xs = [r["infer_per_s"] for r in records]
        ax.plot(xs, [r["p50_ms"] for r in records], "-o", color=colour, label=f"{label} p50")
        ax.plot(xs, [r["p99_ms"] for r in records], "--^", color=colour, label=f"{label} p99")
        for r, x in zip(records, xs, strict=True):
            tag = f"r{r['target_rate']:g}" if r.get("mode") == "rate" else f"c{r['concurrency']}"
            ax.annotate(
                tag,
                (x, r["p50_ms"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
                color=colour,
            )
    ax.set_xlabel("throughput (infer/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
