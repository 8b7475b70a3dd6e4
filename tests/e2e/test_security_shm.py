"""Issue #12, shared memory: attacks on `despina serve --allow-client-shm=true` through
tritonclient and its shared-memory utilities, each refused cleanly, each followed by a
normal inference from the same, still running, processes.

- a key that is a symlink to a file elsewhere: refused at registration with the one
  message every unusable key gets; the file is neither read nor written;
- a key swapped for a symlink after registration: the request is refused, both for an
  input read and for an output write;
- the server's own arena segments, registered by name: refused (their names are
  reserved), and they are mode 0600 with 128 random bits in the name;
- a missing key, one too small, a directory, a fifo: all the same message;
- a shm filesystem too small for a request: UNAVAILABLE, no SIGBUS;
- a client region truncated in a loop while requests write into it: the backend host
  survives (pwrite, not stores into a mapping).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import threading
import time
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from conftest import SHIPPED_REPOSITORY, DespinaServer

SECRET = b"top secret, not for clients\n" * 16


def refused(key: str) -> str:
    return f"Unable to open shared memory region: '{key}'"


@pytest.fixture()
def entries(shm_dir_entries):
    """``shm_dir_entries`` as keys (with shm_open's leading '/')."""
    return lambda maker: "/" + shm_dir_entries(maker)


@pytest.fixture()
def secret(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    return path


@pytest.fixture()
def client(server):
    c = httpclient.InferenceServerClient(server.url, network_timeout=60)
    c.unregister_system_shared_memory()
    yield c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture()
def grpc_client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.unregister_system_shared_memory()
    c.close()


def registration_error(client, key: str, byte_size: int = 64) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        client.register_system_shared_memory("evil", key, byte_size)
    return info.value.status(), info.value.message()


def assert_still_serving(url: str, n: int = 16) -> None:
    """A plain inference (bytes in the request) on the same server."""
    client = httpclient.InferenceServerClient(url, network_timeout=60)
    data = np.arange(n, dtype=np.float32).reshape(1, n)
    inp = httpclient.InferInput("INPUT0", [1, n], "FP32")
    inp.set_data_from_numpy(data, binary_data=True)
    result = client.infer("identity_fp32", [inp])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    client.close()


def identity_through(client, in_name: str, out_name: str, n: int, offset: int = 0):
    """identity_fp32 with INPUT0 read from ``in_name`` and OUTPUT0 written to ``out_name``."""
    inp = httpclient.InferInput("INPUT0", [1, n], "FP32")
    inp.set_shared_memory(in_name, 4 * n)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
    out.set_shared_memory(out_name, 4 * n, offset=offset)
    return client.infer("identity_fp32", [inp], outputs=[out])


# --- 1. symlinks -------------------------------------------------------------------------


def test_a_symlink_key_is_refused_and_its_target_untouched(server, client, entries, secret):
    key = entries(lambda p: os.symlink(secret, p))
    assert registration_error(client, key) == ("400", refused(key))
    assert registration_error(client, key[1:]) == ("400", refused(key[1:]))
    # A link to a plain object of /dev/shm is still a link.
    inner = entries(lambda p: open(p, "wb").write(bytes(64)))
    link = entries(lambda p: os.symlink("/dev/shm" + inner, p))
    assert registration_error(client, link) == ("400", refused(link))
    assert client.get_system_shared_memory_status() == []
    assert secret.read_bytes() == SECRET
    assert_still_serving(server.url)


def test_a_symlink_key_is_refused_over_grpc(server, grpc_client, entries, secret):
    key = entries(lambda p: os.symlink(secret, p))
    status, message = registration_error(grpc_client, key)
    assert (status, message) == ("StatusCode.INVALID_ARGUMENT", refused(key))
    assert not grpc_client.get_system_shared_memory_status().regions
    assert secret.read_bytes() == SECRET
    assert_still_serving(server.url)


@pytest.mark.parametrize("swapped", ["input", "output"])
def test_a_key_swapped_for_a_symlink_after_registration(server, client, regions, secret, swapped):
    """Registered as a plain object, then replaced by a link to a file elsewhere: the
    backend host opens keys the same safe way, so the request is refused and the file
    is neither read into the output nor overwritten by it."""
    n = 16
    data = np.arange(n, dtype=np.float32).reshape(1, n)
    in_name, in_key, in_handle = regions(4 * n)
    out_name, out_key, out_handle = regions(4 * n)
    shm.set_shared_memory_region(in_handle, [data])
    client.register_system_shared_memory(in_name, in_key, 4 * n)
    client.register_system_shared_memory(out_name, out_key, 4 * n)
    identity_through(client, in_name, out_name, n)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [1, n]), data)

    key = in_key if swapped == "input" else out_key
    os.unlink(f"/dev/shm{key}")
    os.symlink(secret, f"/dev/shm{key}")
    try:
        with pytest.raises(InferenceServerException) as info:
            identity_through(client, in_name, out_name, n)
        assert info.value.status() == "400"
        assert info.value.message() == (
            f"shared memory object '{key}' is no longer a plain shared memory object "
            "(was it replaced while registered?)"
        )
    finally:
        os.unlink(f"/dev/shm{key}")
    assert secret.read_bytes() == SECRET
    assert_still_serving(server.url)


# --- 2. the server's own segments ----------------------------------------------------------


def test_the_servers_arena_segments_cannot_be_registered(server, client):
    # A large binary request and reply: the frontend's input arena and the backend
    # host's output arena both have a segment in /dev/shm now.
    assert_still_serving(server.url, n=64 * 1024)
    pids = server.child_pids("despina.services")
    segments = [
        name
        for name in os.listdir("/dev/shm")
        if any(re.fullmatch(rf"despina_(fe|bh)_{pid}_[0-9a-f]{{32}}_\d+", name) for pid in pids)
    ]
    roles = {name.split("_")[1] for name in segments}
    assert roles == {"fe", "bh"}, segments
    for name in segments:
        assert stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode) == 0o600
        for key in (name, "/" + name):
            assert registration_error(client, key, 64) == ("400", refused(key))
    # A name of that form that exists nowhere gets the very same answer.
    ghost = f"despina_fe_{pids[0]}_{'0' * 32}_0"
    assert registration_error(client, ghost) == ("400", refused(ghost))
    assert client.get_system_shared_memory_status() == []
    assert_still_serving(server.url)


# --- the one message -----------------------------------------------------------------------


def test_missing_small_directory_and_fifo_read_the_same(server, client, regions, entries):
    _, small, _ = regions(32)
    keys = {
        "missing": f"/despina_sec_missing_{uuid.uuid4().hex[:8]}",
        "too small": small,
        "directory": entries(os.mkdir),
        "fifo": entries(os.mkfifo),
        "hard link": entries(lambda p: os.link(f"/dev/shm{small}", p)),
    }
    started = time.monotonic()
    answers = {what: registration_error(client, key) for what, key in keys.items()}
    assert answers == {what: ("400", refused(key)) for what, key in keys.items()}
    # Nothing waited on the fifo (a reader's open would block for a writer).
    assert time.monotonic() - started < 5
    assert client.get_system_shared_memory_status() == []
    assert_still_serving(server.url)


# --- 5. a small /dev/shm -------------------------------------------------------------------


@pytest.fixture()
def small_shm(tmp_path):
    """A 16 MiB tmpfs for DESPINA_SHM_DIR; skipped where mounting needs root we lack."""
    mountpoint = tmp_path / "shm"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=1777", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 16 MiB tmpfs here (root needed): {mounted.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_request_larger_than_the_shm_filesystem_is_refused(tmp_path, small_shm):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(SHIPPED_REPOSITORY / "identity_fp32", repo / "identity_fp32")
    os.environ["DESPINA_SHM_DIR"] = str(small_shm)
    try:
        srv = DespinaServer(repo, tmp_path / "serve.log").start()
    finally:
        del os.environ["DESPINA_SHM_DIR"]
    try:
        pids = srv.child_pids("despina.services")
        n = 8 * 1024 * 1024  # 32 MiB of FP32
        data = np.ones((1, n), np.float32)
        for protocol in ("http", "grpc"):
            if protocol == "http":
                client = httpclient.InferenceServerClient(srv.url, network_timeout=60)
                inp = httpclient.InferInput("INPUT0", [1, n], "FP32")
                inp.set_data_from_numpy(data, binary_data=True)
                expected_status = "503"
            else:
                client = grpcclient.InferenceServerClient(srv.grpc_url)
                inp = grpcclient.InferInput("INPUT0", [1, n], "FP32")
                inp.set_data_from_numpy(data)
                expected_status = "StatusCode.UNAVAILABLE"
            with pytest.raises(InferenceServerException) as info:
                client.infer("identity_fp32", [inp])
            client.close()
            assert info.value.status() == expected_status, info.value.message()
            assert re.fullmatch(
                rf"out of shared memory: {re.escape(str(small_shm))} \(16 MiB in all, "
                r"[0-9.]+ MiB free\) cannot hold \d+ more bytes \(No space left on device\); "
                r"give the server more shared memory \(docker run --shm-size, compose "
                r"shm_size\) or send smaller requests",
                info.value.message(),
            ), info.value.message()
            assert_still_serving(srv.url)
            assert_still_serving(srv.url, n=256 * 1024)  # 1 MiB each way: in the small shm
        # 9 MiB in fits beside what is reserved; 9 MiB more out does not: the backend
        # host's output arena refuses it, and the host lives on.
        client = httpclient.InferenceServerClient(srv.url, network_timeout=60)
        inp = httpclient.InferInput("INPUT0", [1, 9 * 256 * 1024], "FP32")
        inp.set_data_from_numpy(np.ones((1, 9 * 256 * 1024), np.float32), binary_data=True)
        with pytest.raises(InferenceServerException) as info:
            client.infer("identity_fp32", [inp])
        client.close()
        assert info.value.status() == "503", info.value.message()
        assert info.value.message().startswith(f"out of shared memory: {small_shm} (16 MiB")
        reserved = {
            name.split("_")[1]: os.stat(small_shm / name).st_blocks * 512 >> 20
            for name in os.listdir(small_shm)
        }
        assert reserved == {"fe": 9, "bh": 1}  # the input was in; the output found no room
        assert_still_serving(srv.url, n=256 * 1024)
        assert srv.child_pids("despina.services") == pids
        # Every arena lives in the small tmpfs, none in /dev/shm.
        owners = {int(name.split("_")[2]) for name in os.listdir(small_shm)}
        assert owners and owners <= set(pids), os.listdir(small_shm)
        assert not [
            name
            for name in os.listdir("/dev/shm")
            if any(name.startswith(f"despina_fe_{pid}_") for pid in pids)
        ]
    finally:
        assert srv.stop() == 0, srv.log()
    assert os.listdir(small_shm) == []


# --- 5. client regions truncated while in use ----------------------------------------------


def test_an_output_region_truncated_in_a_loop_does_not_kill_the_backend_host(
    server, client, regions
):
    n = 64 * 1024  # 256 KiB outputs
    data = np.random.default_rng(5).standard_normal((1, n)).astype(np.float32)
    in_name, in_key, in_handle = regions(4 * n)
    out_name, out_key, _ = regions(4 * n)
    shm.set_shared_memory_region(in_handle, [data])
    client.register_system_shared_memory(in_name, in_key, 4 * n)
    client.register_system_shared_memory(out_name, out_key, 4 * n)
    (host,) = server.child_pids("--framework onnxruntime")

    stop = threading.Event()

    def truncate_loop() -> None:
        fd = os.open(f"/dev/shm{out_key}", os.O_RDWR)
        try:
            deadline = time.monotonic() + 10
            while not stop.is_set() and time.monotonic() < deadline:
                os.ftruncate(fd, 0)
                time.sleep(0.0005)
                os.ftruncate(fd, 4 * n)
                time.sleep(0.0005)
        finally:
            os.ftruncate(fd, 4 * n)
            os.close(fd)

    truncator = threading.Thread(target=truncate_loop)
    truncator.start()
    outcomes = {"ok": 0, "refused": 0}
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                identity_through(client, in_name, out_name, n)
                outcomes["ok"] += 1
            except InferenceServerException as exc:
                assert exc.status() == "400", exc.message()
                assert re.fullmatch(
                    rf"shared memory block \[0, {4 * n}\) is outside '{out_key}' of 0 bytes",
                    exc.message(),
                ), exc.message()
                outcomes["refused"] += 1
    finally:
        stop.set()
        truncator.join()
    assert sum(outcomes.values()) > 10, outcomes
    assert server.child_pids("--framework onnxruntime") == [host]
    # The region, whole again, serves; and so does everything else.
    identity_through(client, in_name, out_name, n)
    assert bytes(open(f"/dev/shm{out_key}", "rb").read()) == data.tobytes()
    assert_still_serving(server.url)


def test_an_input_region_shrunk_below_its_block_is_refused(server, client, regions):
    n = 1024
    data = np.ones((1, n), np.float32)
    in_name, in_key, in_handle = regions(4 * n)
    out_name, out_key, _ = regions(4 * n)
    shm.set_shared_memory_region(in_handle, [data])
    client.register_system_shared_memory(in_name, in_key, 4 * n)
    client.register_system_shared_memory(out_name, out_key, 4 * n)
    (host,) = server.child_pids("--framework onnxruntime")
    identity_through(client, in_name, out_name, n)
    os.truncate(f"/dev/shm{in_key}", 100)
    with pytest.raises(InferenceServerException) as info:
        identity_through(client, in_name, out_name, n)
    assert info.value.status() == "400"
    assert info.value.message() == (
        f"shared memory block [0, {4 * n}) is outside '{in_key}' of 100 bytes"
    )
    os.truncate(f"/dev/shm{in_key}", 4 * n)  # back, as zeros past byte 100
    identity_through(client, in_name, out_name, n)
    assert server.child_pids("--framework onnxruntime") == [host]
    assert_still_serving(server.url)
