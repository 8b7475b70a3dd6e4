"""The compose test's client: checks a running Despina from the host with tritonclient.

Run by deploy/compose-test.sh (``python deploy/compose_check.py serve|wait``); it owns
only its client shared-memory regions, which it unregisters and removes on every path.
Raises SystemExit with a message on the first check that fails.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("check", choices=["serve", "wait"])
    parser.add_argument("--http", default="localhost:8000")
    parser.add_argument("--grpc", default="localhost:8001")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    {"serve": serve, "wait": wait}[args.check](args)


if __name__ == "__main__":
    main(sys.argv[1:])
