#!/usr/bin/env python3
"""Large tensors: MB/s through Despina for HTTP binary, gRPC and client system shared
memory, at 1, 16 and 64 MiB, next to a plain in-process numpy copy of the same size on
the same machine in the same run (the physical reference).

    python loadtest/tensors.py [--sizes-mib 1,16,64] [-d 4] [--json-out F] [--md-out F]

It starts ``despina serve --allow-client-shm=true`` on the shipped repository and drives
``identity_fp32`` (FP32 [1, N]) with loadtest/perf.py, one request in flight (c=1), so the
figure is the time of one inference. MB/s counts the input tensor once (10^6 bytes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # local_despina, overhead
from local_despina import despina, perf_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROTOCOLS = ("http-binary", "grpc", "http-shm")


def numpy_copy_ms(nbytes: int, repeat: int = 20) -> float:
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mib", default="1,16,64")
    parser.add_argument("-d", "--duration", type=float, default=4.0)
    parser.add_argument("--json-out")
    parser.add_argument("--md-out")
    args = parser.parse_args(argv)
    rows = []
    with despina(["--allow-client-shm=true"], "tensors") as served:
        http, grpc = served.http_port, served.grpc_port
        for mib in [int(x) for x in args.sizes_mib.split(",")]:
            nbytes = mib << 20
            floor = numpy_copy_ms(nbytes)
            row = {
                "mib": mib,
                "numpy_copy_ms": floor,
                "numpy_copy_mb_s": nbytes / 1e6 / (floor / 1e3),
            }
            for protocol in PROTOCOLS:
                url = f"127.0.0.1:{grpc}" if protocol == "grpc" else f"http://127.0.0.1:{http}"
                try:
                    run = perf_run(
                        url,
                        "identity_fp32",
                        protocol,
                        1,
                        args.duration,
                        1,
                        "--shape-override",
                        str(nbytes // 4),
                    )
                    row[protocol] = {
                        "ms_p50": run["p50_ms"],
                        "mb_s": nbytes / 1e6 / (run["p50_ms"] / 1e3),
                    }
                except subprocess.CalledProcessError as exc:
                    row[protocol] = {"error": (exc.stderr or exc.stdout)[-300:]}
                except (ValueError, KeyError, IndexError) as exc:
                    row[protocol] = {"error": f"unreadable perf.py output: {exc}"}
            rows.append(row)
            cells = ", ".join(
                f"{p} {row[p]['ms_p50']:.2f} ms ({row[p]['mb_s']:.0f} MB/s)"
                if "ms_p50" in row[p]
                else f"{p} error"
                for p in PROTOCOLS
            )
            print(
                f"{mib} MiB: numpy copy {floor:.2f} ms ({row['numpy_copy_mb_s']:.0f} MB/s); {cells}",
                flush=True,
            )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    if args.md_out:
        lines = [
            "| size | numpy copy | " + " | ".join(PROTOCOLS) + " |",
            "|---" * (2 + len(PROTOCOLS)) + "|",
        ]
        for row in rows:
            cells = [
                f"{row[p]['ms_p50']:.2f} ms, {row[p]['mb_s']:.0f} MB/s"
                if "ms_p50" in row[p]
                else "error"
                for p in PROTOCOLS
            ]
            lines.append(
                f"| {row['mib']} MiB | {row['numpy_copy_ms']:.2f} ms, {row['numpy_copy_mb_s']:.0f} MB/s | "
                + " | ".join(cells)
                + " |"
            )
        Path(args.md_out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
