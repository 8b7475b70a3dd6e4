#!/usr/bin/env python3
"""Where a request's time goes in Despina: CPU per request in each process, and the
floor each kind of hop costs on this machine, measured in the same run.

    python loadtest/hops.py [--model add_sub] [--concurrency 1,8,32] [-d 5] [--json-out F]

1. Floors: a round trip over a plain unix-socket stream (common/streams.py's framing) and
   over ZeroMQ DEALER/ROUTER (common/transport.py), each driven the way the services
   drive them; half a round trip is one hop. Then what waking a process costs: a round
   trip between two processes over a socket pair, both asleep in ``recv`` between
   messages, and both polling (non-blocking ``recv`` in a loop, as --busy-poll-us does).
2. Despina: starts ``despina serve`` on the shipped repository, drives the model with
   loadtest/perf.py (HTTP JSON) at each concurrency, and reads each service process's CPU
   time from /proc before and after the window: CPU microseconds per request, per process.
3. With py-spy installed (``pip install py-spy``) and ``--profile DIR``, a 3 s raw profile of
   each process in turn, under HTTP load at c=8, for flame graphs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # local_despina, overhead
from local_despina import despina, perf_argv, perf_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TICK = os.sysconf("SC_CLK_TCK")
PROFILE_S = 3


# --- floors ---------------------------------------------------------------------------


async def stream_round_trip(seconds: float) -> float:
    from despina.common import streams

    path = tempfile.mktemp(prefix="despina-hops-", suffix=".sock")
    server = await streams.serve(
        f"unix://{path}", lambda link, burst: [link.send(f) for f in burst]
    )
    done: asyncio.Future | None = None

    def on_reply(_link, _burst) -> None:
        if done is not None and not done.done():
            done.set_result(None)

    link = await streams.connect(f"unix://{path}", on_reply)
    n, start = 0, time.perf_counter()
    loop = asyncio.get_running_loop()
    while time.perf_counter() - start < seconds:
        done = loop.create_future()
        link.send([b"x" * 100])
        await done
        n += 1
    elapsed = time.perf_counter() - start
    link.close()
    server.close()
    os.unlink(path)
    return elapsed / n * 1e6


def zmq_echo(endpoint: str, seconds: float) -> None:
    import uvloop
    import zmq

    from despina.common import transport

    async def run() -> None:
        sock = transport.configure(transport.make_context().socket(zmq.ROUTER))
        sock.bind(endpoint)
        driver = None

        def echo(burst: list) -> None:
            for frames in burst:
                driver.send(frames)  # type: ignore[union-attr]

        driver = transport.SocketDriver(sock, echo)
        await asyncio.sleep(seconds + 2)

    uvloop.run(run())


async def zmq_round_trip(seconds: float) -> float:
    import multiprocessing

    import zmq

    from despina.common import transport

    endpoint = f"ipc://{tempfile.mktemp(prefix='despina-hops-zmq-')}"
    echo = multiprocessing.get_context("spawn").Process(target=zmq_echo, args=(endpoint, seconds))
    echo.start()
    sock = transport.configure(transport.make_context().socket(zmq.DEALER))
    sock.connect(endpoint)
    done: asyncio.Future | None = None

    def on_reply(_burst) -> None:
        if done is not None and not done.done():
            done.set_result(None)

    driver = transport.SocketDriver(sock, on_reply)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(1.0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done = loop.create_future()
        driver.send([b"x" * 100])
        await done
        n += 1
    elapsed = time.perf_counter() - start
    driver.close()
    echo.join()
    return elapsed / n * 1e6


# --- Despina under load -------------------------------------------------------------------


def service_pids(serve_pid: int) -> dict[int, str]:
    pgid = os.getpgid(serve_pid)
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode() for a in argv if a]
        if "despina.services.cli" in words:
            found[int(entry.name)] = "supervisor"
        elif any(w.startswith("despina.services.") for w in words):
            module = next(w for w in words if w.startswith("despina.services."))
            role = module.rsplit(".", 1)[1]
            if "--instance-of" in words:
                role = "python instance " + words[words.index("--instance-of") + 1]
            elif "--framework" in words:
                role = f"backend host ({words[words.index('--framework') + 1]})"
            found[int(entry.name)] = role
    # Python instances are forked from the launcher: same command line, the launcher as parent.
    for pid, role in list(found.items()):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if found.get(ppid) == "backend host (python)" and role == found[ppid]:
            found[pid] = "python instance"
    # Several processes of one role (--frontends 2): tell them apart by pid.
    roles = list(found.values())
    return {pid: role if roles.count(role) == 1 else f"{role} {pid}" for pid, role in found.items()}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def process_round_trip(seconds: float, poll: bool) -> float:
    """p50 µs of a 64-byte round trip to a forked echo process over a socket pair; with
    ``poll`` both ends spin on non-blocking ``recv`` instead of sleeping in it."""
    import socket

    ours, theirs = socket.socketpair()

    def recv(sock: socket.socket) -> bytes:
        while True:
            try:
                return sock.recv(64)
            except BlockingIOError:
                pass

    pid = os.fork()
    if pid == 0:
        ours.close()
        theirs.setblocking(not poll)
        while data := recv(theirs):
            theirs.send(data)
        os._exit(0)
    theirs.close()
    ours.setblocking(not poll)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter_ns()
        ours.send(b"x")
        recv(ours)
        times.append(time.perf_counter_ns() - start)
    ours.close()
    os.waitpid(pid, 0)
    times.sort()
    return times[len(times) // 2] / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="add_sub")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("--floor-seconds", type=float, default=2.0)
    parser.add_argument("--protocol", default="http-json")
    parser.add_argument("--serve-args", default="", help="extra flags for despina serve")
    parser.add_argument("--json-out")
    parser.add_argument("--profile", help="folder for py-spy raw profiles of each process")
    args = parser.parse_args(argv)

    import uvloop

    stream_us = uvloop.run(stream_round_trip(args.floor_seconds))
    zmq_us = uvloop.run(zmq_round_trip(args.floor_seconds))
    asleep_us = process_round_trip(args.floor_seconds, poll=False)
    polling_us = process_round_trip(args.floor_seconds, poll=True)
    print(
        f"floor: unix-stream round trip {stream_us:.0f} us (hop ~{stream_us / 2:.0f} us), "
        f"ZeroMQ round trip {zmq_us:.0f} us (hop ~{zmq_us / 2:.0f} us); between two "
        f"processes p50 {asleep_us:.0f} us asleep, {polling_us:.0f} us polling"
    )

    report: dict = {
        "stream_round_trip_us": stream_us,
        "zmq_round_trip_us": zmq_us,
        "process_round_trip_asleep_us": asleep_us,
        "process_round_trip_polling_us": polling_us,
        "runs": [],
    }
    with despina(args.serve_args.split(), "hops") as served:
        serve, url = served.proc, f"http://127.0.0.1:{served.http_port}"
        pids = service_pids(serve.pid)
        for c in [int(x) for x in args.concurrency.split(",")]:
            before = {pid: cpu_seconds(pid) for pid in pids}
            run = perf_run(url, args.model, args.protocol, c, args.duration, 0)
            after = {pid: cpu_seconds(pid) for pid in pids}
            done = run["infer_per_s"] * args.duration
            per_process = {
                pids[pid]: round((after[pid] - before[pid]) / done * 1e6, 1) for pid in pids
            }
            report["runs"].append(
                {
                    "concurrency": c,
                    "infer_per_s": run["infer_per_s"],
                    "p50_ms": run["p50_ms"],
                    "cpu_us_per_request": per_process,
                }
            )
            print(
                f"c={c}: {run['infer_per_s']:.0f} infer/s, p50 {run['p50_ms']:.3f} ms; "
                "CPU us per request: " + ", ".join(f"{k} {v}" for k, v in per_process.items())
            )
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            # One profile after the other, each under load, sampled alone.
            load = subprocess.Popen(
                perf_argv(url, args.model, args.protocol, 8, PROFILE_S * len(pids) + 3, 0),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
            for pid, role in pids.items():
                name = role.replace(" ", "_").replace("(", "").replace(")", "").replace(":", "-")
                subprocess.run(
                    [
                        "py-spy",
                        "record",
                        "-p",
                        str(pid),
                        "-d",
                        str(PROFILE_S),
                        "-r",
                        "250",
                        "-f",
                        "raw",
                        "--nonblocking",
                        "-o",
                        str(Path(args.profile) / f"{name}.txt"),
                    ],
                    capture_output=True,
                )
            load.wait()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
