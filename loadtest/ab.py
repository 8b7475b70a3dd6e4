#!/usr/bin/env python3
"""A/B of Despina's own settings: one ``despina serve`` per arm (its extra flags), all up
at once, driven in turn by `despina perf`, round after round (each round starting at the
next arm, so no arm is always first), so every arm sees the same
machine; medians per load and arm, and the ratio of each arm to the first.

    python loadtest/ab.py --arm off=--busy-poll-us=0 --arm on= \\
        --load simple:http-binary:1 --load add_sub:http-json:32 --rounds 3 -d 4 \\
        [--out results/raw/busy-poll-ab-<timestamp>.txt]

An arm is ``NAME=FLAGS`` (space-separated ``despina serve`` flags; empty: the
defaults), or ``NAME@REF=FLAGS`` to serve git ``REF``'s code instead of the working tree
(``--arm before@HEAD~1= --arm after=`` measures a change). A load is
``MODEL:PROTOCOL:CONCURRENCY[:PERF FLAGS]``, a model of the shipped repository (an arm's
flags may add ``--model-repository=DIR``), with extra ``despina perf`` flags after a
third colon (``identity_fp32:http-shm:1:--shape-override=4194304``: 16 MiB tensors). Each run's line gives the CPU the hypervisor stole
meanwhile (cores): on this kind of VM a run with more than ~0.15 is slower for that
reason alone, so rounds, not single runs, carry the result.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from local_despina import despina, despina_overlay, perf_run, steal_meter


def parse_arm(text: str) -> tuple[str, str, list[str]]:
    """NAME[@REF]=FLAGS -> (name, ref or "", flags)."""
    head, sep, flags = text.partition("=")
    name, _, ref = head.partition("@")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS or NAME@REF=FLAGS, got '{text}'")
    return name, ref, flags.split()


def parse_load(text: str) -> tuple[str, str, int, tuple[str, ...]]:
    try:
        model, protocol, concurrency, *rest = text.split(":", 3)
        return model, protocol, int(concurrency), tuple(rest[0].split() if rest else ())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MODEL:PROTOCOL:CONCURRENCY[:PERF FLAGS], got '{text}'"
        ) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", type=parse_arm, action="append", required=True)
    parser.add_argument("--load", type=parse_load, action="append", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-d", "--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--out", help="also write every line to this file")
    args = parser.parse_args(argv)

    out = open(args.out, "w") if args.out else None  # noqa: SIM115

    def say(line: str) -> None:
        print(line, flush=True)
        if out is not None:
            out.write(line + "\n")
            out.flush()

    arms = {name: (ref, flags) for name, ref, flags in args.arm}
    if len(arms) != len(args.arm):
        parser.error("arm names must differ")
    say(f"# {time.strftime('%Y-%m-%d %H:%M')} ab.py {' '.join(sys.argv[1:])}")
    runs: dict[tuple, list[dict]] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="despina-ab-")))
        served = {}
        for name, (ref, flags) in arms.items():
            env = None
            if ref:
                env = {**os.environ, "PYTHONPATH": despina_overlay(ref, tmp / name)}
            served[name] = stack.enter_context(despina(flags, name, env=env))
        for rnd in range(1, args.rounds + 1):
            # Each round starts at the next arm: an arm's place in the round (first after
            # the last load's end, or after another server's run) never favours it.
            names = list(served)
            shift = (rnd - 1) % len(names)
            order = names[shift:] + names[:shift]
            for model, protocol, concurrency, perf_flags in args.load:
                for name in order:
                    srv = served[name]
                    url = srv.url_for(protocol)
                    try:
                        with steal_meter() as meter:
                            rec = perf_run(
                                url,
                                model,
                                protocol,
                                concurrency,
                                args.duration,
                                args.warmup,
                                "--server-pid",
                                str(srv.proc.pid),
                                *perf_flags,
                            )
                    except subprocess.CalledProcessError as exc:
                        raise SystemExit(
                            f"despina perf failed against arm {name}:\n{exc.stderr}"
                        ) from None
                    rec.update(meter)
                    rec["server_cpu_us_per_infer"] = _server_us(rec)
                    runs.setdefault((model, protocol, concurrency, name), []).append(rec)
                    say(
                        f"round={rnd} arm={name} {model} {protocol} c={concurrency} "
                        f"infer/s={rec['infer_per_s']:.0f} p50={rec['p50_ms']:.3f} "
                        f"p99={rec['p99_ms']:.3f} ms errors={rec['errors']} "
                        f"client_cpu={rec['client_cpu_us_per_infer']:.0f}us/infer "
                        f"server_cpu={rec['server_cpu_us_per_infer']:.0f}us/infer "
                        f"steal={rec['steal_cores']:.2f}"
                    )
    first = args.arm[0][0]  # its name
    say(f"\n## medians of {args.rounds} rounds; ratio: infer/s against arm '{first}'")
    say("| load | arm | infer/s | p50 ms | p99 ms | server CPU µs/infer | ratio |")
    say("| --- | --- | --- | --- | --- | --- | --- |")
    for model, protocol, concurrency, _ in args.load:
        base = statistics.median(
            r["infer_per_s"] for r in runs[(model, protocol, concurrency, first)]
        )
        for name in arms:
            recs = runs[(model, protocol, concurrency, name)]
            ips = statistics.median(r["infer_per_s"] for r in recs)
            say(
                f"| {model} {protocol} c={concurrency} | {name} | {ips:,.0f} | "
                f"{statistics.median(r['p50_ms'] for r in recs):.3f} | "
                f"{statistics.median(r['p99_ms'] for r in recs):.3f} | "
                f"{statistics.median(r['server_cpu_us_per_infer'] for r in recs):.0f} | "
                f"{ips / base:.2f} |"
            )
    if out is not None:
        out.close()


def _server_us(rec: dict) -> float:
    """CPU the whole server tree spent per request of the window, in µs."""
    return rec["server_cpu_s"] / rec["requests"] * 1e6 if rec["requests"] else float("nan")


if __name__ == "__main__":
    main()
