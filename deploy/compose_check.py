"""The compose test's client: checks a running Despina from the host with tritonclient.

Run by deploy/compose-test.sh (``python deploy/compose_check.py serve|wait|frontends``); it owns
only its client shared-memory regions, which it unregisters and removes on every path.
Raises SystemExit with a message on the first check that fails.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm

LARGE = 256 * 1024  # bytes: above the 64 KiB inline threshold, so it rides /dev/shm


def fail(message: str) -> None:
    raise SystemExit(f"compose check failed: {message}")


def clients(args: argparse.Namespace) -> list[tuple[str, Any, Any]]:
    return [
        (
            "http",
            httpclient.InferenceServerClient(
                args.http, connection_timeout=5.0, network_timeout=30.0
            ),
            httpclient,
        ),
        ("grpc", grpcclient.InferenceServerClient(args.grpc), grpcclient),
    ]


def check_ready(args: argparse.Namespace) -> None:
    """Waits for both protocols to say live and ready, and the models to be ready."""
    deadline = time.monotonic() + args.timeout
    for proto, client, _ in clients(args):
        last: Exception | None = None
        while True:
            try:
                if (
                    client.is_server_live()
                    and client.is_server_ready()
                    and all(client.is_model_ready(m) for m in ("simple", "add_sub"))
                ):
                    break
            except Exception as exc:  # noqa: BLE001 - not up yet: any error means retry
                last = exc
            else:
                last = None
            if time.monotonic() > deadline:
                fail(f"{proto}: not ready after {args.timeout}s ({last})")
            time.sleep(0.5)
        print(f"{proto}: server live and ready, simple and add_sub ready")


def check_simple(proto: str, client, mod) -> None:
    """ONNX Runtime: simple adds and subtracts two INT32 vectors."""
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    inputs = [
        mod.InferInput("INPUT0", [1, 16], "INT32"),
        mod.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("simple", inputs)
    if (
        not (result.as_numpy("OUTPUT0") == a + b).all()
        or not (result.as_numpy("OUTPUT1") == a - b).all()
    ):
        fail(f"{proto}: simple returned wrong sums/differences")


def check_add_sub(proto: str, client, mod) -> None:
    """Python backend: add_sub on FP32."""
    a = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 16)
    b = np.full((1, 16), 0.5, dtype=np.float32)
    inputs = [mod.InferInput("INPUT0", [1, 16], "FP32"), mod.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("add_sub", inputs)
    if not np.allclose(result.as_numpy("OUTPUT0"), a + b) or not np.allclose(
        result.as_numpy("OUTPUT1"), a - b
    ):
        fail(f"{proto}: add_sub returned wrong values")


def check_shared_memory(proto: str, client, mod) -> None:
    """identity_fp32 on a 256 KiB tensor in, and out, through client regions in /dev/shm."""
    count = LARGE // 4
    data = np.random.default_rng(7).random((1, count), dtype=np.float32)
    names = (f"despina_compose_{proto}_in", f"despina_compose_{proto}_out")
    handles = [shm.create_shared_memory_region(n, "/" + n, LARGE) for n in names]
    try:
        shm.set_shared_memory_region(handles[0], [data])
        for name in names:
            client.register_system_shared_memory(name, "/" + name, LARGE)
        inp = mod.InferInput("INPUT0", [1, count], "FP32")
        inp.set_shared_memory(names[0], LARGE)
        out = mod.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory(names[1], LARGE)
        client.infer("identity_fp32", [inp], outputs=[out])
        got = shm.get_contents_as_numpy(handles[1], np.float32, [1, count])
        if not np.array_equal(got, data):
            fail(f"{proto}: identity_fp32 through shared memory returned other values")
    finally:
        for name in names:
            try:
                client.unregister_system_shared_memory(name)
            except Exception:  # noqa: BLE001 - cleanup after a failure already reported
                pass
        for handle in handles:
            shm.destroy_shared_memory_region(handle)


def serve(args: argparse.Namespace) -> None:
    check_ready(args)
    for proto, client, mod in clients(args):
        check_simple(proto, client, mod)
        check_add_sub(proto, client, mod)
        check_shared_memory(proto, client, mod)
        print(f"{proto}: simple (ONNX), add_sub (Python), 256 KiB identity_fp32 via /dev/shm: ok")


def wait(args: argparse.Namespace) -> None:
    """Retries simple over both protocols until it answers right (a host took over)."""
    deadline = time.monotonic() + args.timeout
    start = time.monotonic()
    for proto, client, mod in clients(args):
        while True:
            try:
                check_simple(proto, client, mod)
                break
            except SystemExit:
                raise
            except Exception as exc:  # noqa: BLE001 - the model may be placed again: retry
                if time.monotonic() > deadline:
                    fail(f"{proto}: simple not served again after {args.timeout}s ({exc})")
                time.sleep(0.5)
    print(f"simple served again over HTTP and gRPC after {time.monotonic() - start:.1f}s")


# Run inside the frontend container: for each frontend process (the --frontends
# siblings), how many established TCP connections on the HTTP port it holds, as JSON.
PROBE = """
import json, os, sys
port = int(sys.argv[1])
inodes = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        lines = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for line in lines:
        f = line.split()
        if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port:
            inodes.add("socket:[%s]" % f[9])
held = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = open("/proc/%s/cmdline" % pid, "rb").read().split(b"\\0")
        if b"despina.services.frontend" not in cmd or b"--frontends=1" not in cmd:
            continue
        fds = os.listdir("/proc/%s/fd" % pid)
        held[pid] = sum(os.readlink("/proc/%s/fd/%s" % (pid, fd)) in inodes for fd in fds)
    except OSError:
        continue
print(json.dumps(held))
"""


def open_connections(address: str, count: int) -> list[socket.socket]:
    """``count`` HTTP keep-alive connections, each answered 200 to a ready check (so each
    is accepted by some frontend process); the caller closes them."""
    host, _, port = address.rpartition(":")
    conns = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=10)
        conns.append(sock)
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: despina\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            fail(f"a ready check on a new connection got {head[:40]!r}")
    return conns


def frontends(args: argparse.Namespace) -> None:
    """Every one of the frontend container's ``--expect`` processes serves: new
    connections to the HTTP port (spread by the kernel, SO_REUSEPORT) are answered, and
    each process holds some of them (read from /proc inside the container)."""
    check_ready(args)
    conns = open_connections(args.http, args.connections)
    try:
        port = args.http.rpartition(":")[2]
        out = subprocess.run(
            [args.docker, "exec", "-i", args.container, "python3", "-", port],
            input=PROBE,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if out.returncode != 0:
            fail(f"probing the frontend container failed: {out.stderr.strip()[-400:]}")
        held = {int(pid): n for pid, n in json.loads(out.stdout).items()}
    finally:
        for sock in conns:
            sock.close()
    summary = ", ".join(f"pid {pid}: {n}" for pid, n in sorted(held.items()))
    print(f"frontend processes and the {args.connections} connections each holds: {summary}")
    if len(held) != args.expect:
        fail(f"expected {args.expect} frontend processes in the container, found {len(held)}")
    idle = [pid for pid, n in held.items() if n == 0]
    if idle:
        fail(f"frontend process(es) {idle} took none of {args.connections} new connections")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("check", choices=["serve", "wait", "frontends"])
    parser.add_argument("--http", default="localhost:8000")
    parser.add_argument("--grpc", default="localhost:8001")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--container", help="frontends: the frontend container's id")
    parser.add_argument("--expect", type=int, default=2, help="frontends: processes expected")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--docker", default="docker", help="frontends: the docker client")
    args = parser.parse_args(argv)
    {"serve": serve, "wait": wait, "frontends": frontends}[args.check](args)


if __name__ == "__main__":
    main(sys.argv[1:])
