"""``despina perf``'s flags (perf_analyzer's where they exist) and the run: resolve the
model, build and check the request, drive each concurrency or rate, report."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from despina.services.perf.http_engine import cpu_seconds_of, run_python, run_wrk, split_evenly
from despina.services.perf.report import format_line, plot_latency_throughput, summarize, write_csv
from despina.services.perf.target import (
    PROTOCOLS,
    LoadTestError,
    ShmRegions,
    Target,
    build_body,
    build_request,
    build_shm_body,
    fetch_json,
    infer_path,
    parse_shape_overrides,
    preflight,
    random_tensor,
    raw_bytes,
    resolve_inputs,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="despina perf",
        description="KServe v2 load generator (HTTP, gRPC, system shared memory) for Despina"
        " and Triton: closed loop (-c/--sweep) or open loop (--rate).",
    )
    p.add_argument(
        "--url",
        default=None,
        help="server base URL (default http://127.0.0.1:8000; 127.0.0.1:8001 for grpc)",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--model-version", default="", help="infer a specific version")
    p.add_argument(
        "-c",
        "--concurrency",
        type=int,
        default=None,
        help="connections in flight (default 1); with --rate, the connection pool (default 64)",
    )
    p.add_argument("--sweep", default="", help="comma list of concurrencies, e.g. 1,8,32")
    p.add_argument(
        "--rate",
        default="",
        help="open loop: requests/s on a fixed schedule; a comma list sweeps rates",
    )
    p.add_argument("-d", "--duration", type=float, default=10.0, help="window seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per run")
    p.add_argument("--protocol", choices=PROTOCOLS, default="http-json")
    p.add_argument("--processes", type=int, default=1, help="client processes (python engine)")
    p.add_argument(
        "--engine",
        choices=("auto", "python", "wrk", "h2load"),
        default="auto",
        help="auto: python for HTTP; h2load for grpc when installed (python with --rate)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="batch dim for batching models")
    p.add_argument(
        "--shape-override",
        action="append",
        default=[],
        metavar="NAME:D1,D2|N",
        help="input shape without the batch dim, or N for every -1 dim (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the random input data")
    p.add_argument(
        "--server-pid",
        action="append",
        default=[],
        metavar="PID[,PID]",
        help="also report CPU seconds of these processes and their children",
    )
    p.add_argument("--json-out", help="write the results as JSON to this file")
    p.add_argument("--csv-out", help="write one CSV row per run to this file")
    p.add_argument("--plot", help="write a latency-vs-throughput PNG of the runs to this file")
    p.add_argument("--label", default="", help="series name in the CSV and the plot")
    args = p.parse_args(argv)
    try:
        args.rates = [float(x) for x in args.rate.split(",") if x.strip()]
        if args.rates:
            if args.sweep:
                p.error("--rate and --sweep are exclusive")
            args.levels = [args.concurrency or 64] * len(args.rates)
        else:
            args.levels = (
                [int(x) for x in args.sweep.split(",") if x.strip()]
                if args.sweep
                else [args.concurrency or 1]
            )
            args.rates = [0.0] * len(args.levels)
        args.server_pids = [int(x) for v in args.server_pid for x in v.split(",") if x.strip()]
    except ValueError as exc:
        p.error(str(exc))
    if any(c < 1 for c in args.levels) or args.processes < 1 or args.duration <= 0:
        p.error("concurrency, processes and duration must be positive")
    if any(r < 0 for r in args.rates):
        p.error("--rate must be positive")
    grpc = args.protocol in ("grpc", "grpc-stream")
    if args.protocol == "grpc-stream":
        if args.engine in ("h2load", "wrk"):
            p.error("--protocol grpc-stream is driven by grpc.aio only (--engine python)")
        if any(args.rates):
            p.error("--protocol grpc-stream runs closed loop only: drop --rate")
        args.engine = "python"
    if args.engine == "auto":
        if grpc:
            from despina.services.perf import grpc_engine

            use_h2load = grpc_engine.h2load_path() is not None and not any(args.rates)
            args.engine = "h2load" if use_h2load else "python"
        else:
            args.engine = "python"
    if args.engine == "h2load" and not grpc:
        p.error("--engine h2load drives --protocol grpc only (wrk drives HTTP)")
    if args.engine == "wrk" and grpc:
        p.error("--engine wrk drives HTTP only (h2load drives grpc)")
    if args.engine in ("wrk", "h2load") and any(args.rates):
        p.error("--rate needs --engine python")
    if args.url is None:
        args.url = "127.0.0.1:8001" if grpc else "http://127.0.0.1:8000"
    return args


def _run_grpc(args: argparse.Namespace) -> tuple[list[dict], dict]:
    from despina.services.perf import grpc_engine

    try:
        address = grpc_engine.parse_address(args.url)
        metadata, config = grpc_engine.fetch_model(address, args.model, args.model_version)
        overrides, default_dim = parse_shape_overrides(args.shape_override)
        inputs = resolve_inputs(metadata, config, overrides, default_dim, args.batch_size)
        outputs = [o["name"] for o in metadata.get("outputs", [])]
        rng = np.random.default_rng(args.seed)
        raws = [(s, raw_bytes(s, random_tensor(rng, s))) for s in inputs]
        request = grpc_engine.build_request(args.model, args.model_version, raws, outputs)
        stream = args.protocol == "grpc-stream"
        if stream:
            response_size = grpc_engine.preflight_stream(address, request)
        else:
            response_size = grpc_engine.preflight(address, request)
        tensor_bytes = sum(len(r) for _, r in raws)
        shapes = " ".join(f"{s.name}:{s.datatype}{list(s.shape)}" for s in inputs)
        print(
            f"# {args.model} via grpc://{address}{' streams' if stream else ''}"
            f" engine={args.engine} inputs {shapes}"
            f" request={len(request)}B response={response_size}B",
            file=sys.stderr,
        )
        records = []
        for concurrency, rate in zip(args.levels, args.rates, strict=True):
            if args.engine == "h2load":
                raw = grpc_engine.run_h2load(
                    address,
                    request,
                    concurrency,
                    args.warmup,
                    args.duration,
                    args.server_pids,
                    cpu_seconds_of,
                )
            else:
                raw = grpc_engine.run_aio(
                    address,
                    request,
                    concurrency,
                    args.processes,
                    rate,
                    args.warmup,
                    args.duration,
                    args.server_pids,
                    cpu_seconds_of,
                    split_evenly,
                    stream,
                )
            records.append(_report(raw, args, concurrency, rate, tensor_bytes))
    except grpc_engine.GrpcSetupError as exc:
        raise LoadTestError(str(exc)) from None
    info = {
        "url": f"grpc://{address}",
        "inputs": inputs,
        "request_bytes": len(request),
        "response_bytes": response_size,
    }
    return records, info


def _report(raw: dict, args: argparse.Namespace, concurrency: int, rate: float, nbytes: int):
    processes = 1 if args.engine == "h2load" else min(args.processes, concurrency)
    record = summarize(raw, args.protocol, args.engine, concurrency, processes, rate, nbytes)
    record["label"] = args.label or None
    record["model"] = args.model
    print(format_line(record), flush=True)
    if record["first_error"]:
        print(f"  first error: {record['first_error']}", file=sys.stderr)
    return record


def _run_http(args: argparse.Namespace) -> tuple[list[dict], dict]:
    target = Target.parse(args.url)
    model_path = f"/v2/models/{args.model}"
    if args.model_version:
        model_path += f"/versions/{args.model_version}"
    metadata = fetch_json(target, model_path)
    try:
        config = fetch_json(target, f"{model_path}/config")
    except LoadTestError as exc:
        print(f"warning: no model config ({exc}); assuming max_batch_size 0", file=sys.stderr)
        config = {}
    overrides, default_dim = parse_shape_overrides(args.shape_override)
    inputs = resolve_inputs(metadata, config, overrides, default_dim, args.batch_size)
    outputs = [o["name"] for o in metadata.get("outputs", [])]
    path = infer_path(target, args.model, args.model_version)
    rng = np.random.default_rng(args.seed)
    tensor_bytes = sum(len(raw_bytes(s, random_tensor(rng, s))) for s in inputs)
    regions = ShmRegions(target)
    try:
        if args.protocol == "http-shm":
            body, headers = build_shm_body(target, path, regions, inputs, outputs, args.seed)
        else:
            body, headers = build_body(args.protocol, inputs, outputs, args.seed)
        request = build_request(target, path, body, headers)
        response_size = preflight(target, request)
        shapes = " ".join(f"{s.name}:{s.datatype}{list(s.shape)}" for s in inputs)
        print(
            f"# {args.model} via {target.url(path[len(target.base_path) :])} {args.protocol}"
            f" engine={args.engine} inputs {shapes} request={len(body)}B"
            f" response={response_size}B",
            file=sys.stderr,
        )
        records = []
        for concurrency, rate in zip(args.levels, args.rates, strict=True):
            if args.engine == "wrk":
                raw = run_wrk(
                    target,
                    path,
                    body,
                    headers,
                    concurrency,
                    args.processes,
                    args.warmup,
                    args.duration,
                    args.server_pids,
                )
            else:
                raw = run_python(
                    target,
                    request,
                    concurrency,
                    args.processes,
                    args.warmup,
                    args.duration,
                    args.server_pids,
                    rate,
                )
            records.append(_report(raw, args, concurrency, rate, tensor_bytes))
    finally:
        regions.close()
    info = {
        "url": args.url,
        "inputs": inputs,
        "request_bytes": len(body),
        "response_bytes": response_size,
    }
    return records, info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.protocol in ("grpc", "grpc-stream"):
            records, info = _run_grpc(args)
        else:
            records, info = _run_http(args)
    except LoadTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json_out:
        doc = {
            "url": info["url"],
            "model": args.model,
            "model_version": args.model_version or None,
            "protocol": args.protocol,
            "inputs": [
                {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                for s in info["inputs"]
            ],
            "request_bytes": info["request_bytes"],
            "response_bytes": info["response_bytes"],
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "runs": records,
        }
        with open(args.json_out, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    if args.csv_out:
        write_csv(records, args.csv_out)
    if args.plot:
        title = f"{args.model} {args.protocol}"
        plot_latency_throughput({args.label or args.url: records}, args.plot, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
