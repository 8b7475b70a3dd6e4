"""The framing of the data-plane streams (common/streams.py): every split of the bytes
into reads gives the same messages, in order; a real unix socket carries large ones; a
peer announcing more than the limits is cut off before anything is buffered for it; TCP
streams with a cluster secret talk only to peers that prove they hold it."""

from __future__ import annotations

import asyncio
import struct

import pytest
import uvloop

from despina.common import streams


def framed(*frames: bytes) -> bytes:
    return struct.pack(f"<I{len(frames)}I", len(frames), *map(len, frames)) + b"".join(frames)


MESSAGES = [
    [b"header-1", b"x" * 100, b""],
    [b"h2"],
    [b"header-3", bytes(range(256)) * 40],
]
WIRE = b"".join(framed(*m) for m in MESSAGES)


def receiver() -> tuple[streams.FramedProtocol, list[list]]:
    got: list[list] = []
    proto = streams.FramedProtocol(lambda _link, burst: got.extend(burst))
    return proto, got


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64, 1000, len(WIRE)])
def test_every_split_into_reads_gives_the_same_messages(chunk):
    proto, got = receiver()
    for start in range(0, len(WIRE), chunk):
        proto.data_received(WIRE[start : start + chunk])
    assert got == MESSAGES
    assert all(type(f) is bytes for m in got for f in m)
    assert not proto._buf  # nothing left over


def test_a_message_split_at_each_byte_then_one_read_with_several():
    proto, got = receiver()
    for cut in range(1, len(WIRE)):
        proto.data_received(WIRE[:cut])
        proto.data_received(WIRE[cut:])
    assert got == MESSAGES * (len(WIRE) - 1)


def test_a_message_claiming_too_many_frames_closes_the_stream():
    closed = []

    class Transport:
        def close(self) -> None:
            closed.append(True)

        abort = close

    proto, got = receiver()
    proto.transport = Transport()  # type: ignore[assignment]
    proto.data_received(struct.pack("<I", streams.MAX_FRAMES + 1) + b"\0" * 16)
    assert closed and not got


def test_large_messages_over_a_unix_socket(tmp_path):
    big = bytes(range(256)) * (3 << 12)  # 3 MiB: many reads on the way

    async def main() -> list[list]:
        got: list[list] = []
        done = asyncio.get_running_loop().create_future()

        def on_burst(_link, burst):
            got.extend(burst)
            if len(got) == 3 and not done.done():
                done.set_result(None)

        endpoint = f"unix://{tmp_path}/s"
        server = await streams.serve(endpoint, on_burst)
        client = await streams.connect(endpoint, lambda _link, _burst: None)
        for message in ([b"a", big], [b"b"], [b"c", memoryview(big)[:1000], b"tail"]):
            assert client.send(message)
        await asyncio.wait_for(done, 10)
        client.close()
        server.close()
        return got

    got = uvloop.run(main())
    assert got == [[b"a", big], [b"b"], [b"c", big[:1000], b"tail"]]


class RecordingTransport:
    def __init__(self) -> None:
        self.aborted = False
        self.written = b""

    def close(self) -> None:
        self.aborted = True

    abort = close

    def write(self, data: bytes) -> None:
        self.written += data

    def get_extra_info(self, name: str, default=None):
        return default


@pytest.mark.parametrize(
    "head",
    [
        # one frame announcing the most a u32 can say, where the limit is lower
        struct.pack("<II", 1, 0xFFFFFFFF),
        # many frames that add up past the limit
        struct.pack("<I", 3) + struct.pack("<3I", 16, 0xFFFFFFF0, 0xFFFFFFF0),
        # a header frame past its own limit
        struct.pack("<II", 1, (1 << 26) + 1),
        # no frames at all: not a message
        struct.pack("<I", 0) + b"\0" * 8,
    ],
)
def test_a_message_announced_past_the_limits_is_cut_off_before_buffering(head, monkeypatch):
    monkeypatch.setattr(streams, "MAX_MESSAGE_BYTES", 1 << 30)
    proto, got = receiver()
    transport = RecordingTransport()
    proto.transport = transport  # type: ignore[assignment]
    proto.data_received(head + b"x" * 100)
    assert transport.aborted
    assert not got
    assert len(proto._buf) == 0 and proto._need == 0  # nothing kept for it


def test_a_message_at_the_limit_is_accepted(monkeypatch):
    monkeypatch.setattr(streams, "MAX_MESSAGE_BYTES", 1000)
    proto, got = receiver()
    transport = RecordingTransport()
    proto.transport = transport  # type: ignore[assignment]
    proto.data_received(framed(b"h" * 10, b"x" * 990))
    assert got == [[b"h" * 10, b"x" * 990]] and not transport.aborted
    proto.data_received(framed(b"h" * 10, b"x" * 991))
    assert transport.aborted and len(got) == 1


def test_send_refuses_a_message_past_the_limit(monkeypatch):
    monkeypatch.setattr(streams, "MAX_MESSAGE_BYTES", 100_000)

    class Transport(RecordingTransport):
        def is_closing(self) -> bool:
            return False

        def get_write_buffer_size(self) -> int:
            return 0

        def writelines(self, parts) -> None:
            for part in parts:
                self.written += bytes(part)

    proto, _ = receiver()
    transport = Transport()
    proto.transport = transport  # type: ignore[assignment]
    assert not proto.send([b"h", b"x" * 100_000])
    assert transport.written == b"" and not transport.aborted
    assert proto.send([b"h", b"x" * 99_999])
    assert len(transport.written) == 4 + 8 + 100_000


def test_unix_socket_is_private_to_its_user(tmp_path):
    async def main() -> int:
        server = await streams.serve(f"unix://{tmp_path}/s", lambda _l, _b: None)
        mode = (tmp_path / "s").stat().st_mode & 0o777
        server.close()
        return mode

    assert uvloop.run(main()) & 0o077 == 0  # no one but its user may connect


# --- TCP with a cluster secret ------------------------------------------------------------


def _tcp_endpoint() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_peers_with_the_same_secret_exchange_messages(monkeypatch):
    monkeypatch.setenv(streams.SECRET_ENV, "s3cret")
    endpoint = _tcp_endpoint()

    async def main() -> tuple[list, list]:
        got: list = []
        back: list = []
        done = asyncio.get_running_loop().create_future()

        def on_burst(link, burst):
            got.extend(burst)
            link.send([b"pong"])

        def on_reply(_link, burst):
            back.extend(burst)
            done.set_result(None)

        server = await streams.serve(endpoint, on_burst)
        client = await streams.connect(endpoint, on_reply)
        assert client.send([b"ping", b"x" * 70_000])
        await asyncio.wait_for(done, 5)
        client.close()
        server.close()
        return got, back

    got, back = uvloop.run(main())
    assert got == [[b"ping", b"x" * 70_000]] and back == [[b"pong"]]


def test_a_peer_without_the_secret_is_cut_off_before_any_message(monkeypatch, caplog):
    monkeypatch.setenv(streams.SECRET_ENV, "s3cret")
    endpoint = _tcp_endpoint()
    host, port = streams.parse_endpoint(endpoint)

    async def main() -> tuple[list, bytes, bytes]:
        got: list = []
        lost: list = []
        server = await streams.serve(endpoint, lambda _l, b: got.extend(b), lost.append)
        reader, writer = await asyncio.open_connection(host, port)
        challenge = await asyncio.wait_for(reader.readexactly(streams.CHALLENGE_BYTES), 5)
        # A host's hello, framed as a peer without the secret sends it: no answer first.
        writer.write(framed(b"host_hello" * 10, b"x" * 64))
        rest = await asyncio.wait_for(reader.read(), 5)  # b"": the listener closed
        writer.close()
        server.close()
        return got + lost, challenge, rest

    seen, challenge, rest = uvloop.run(main())
    assert seen == []  # neither a message nor the stream reached the owner
    assert challenge.startswith(b"DSPNAUTH") and rest == b""
    assert "does not know the cluster secret" in caplog.text


def test_a_wrong_secret_cannot_connect(monkeypatch):
    endpoint = _tcp_endpoint()

    async def main() -> str:
        monkeypatch.setenv(streams.SECRET_ENV, "right")
        server = await streams.serve(endpoint, lambda _l, _b: None)
        monkeypatch.setenv(streams.SECRET_ENV, "wrong")
        try:
            await streams.connect(endpoint, lambda _l, _b: None)
        except ConnectionRefusedError as exc:
            return str(exc)
        finally:
            server.close()
        return "connected"

    refused = uvloop.run(main())
    assert "authentication" in refused, refused


def test_a_secret_client_refuses_a_listener_without_one(monkeypatch):
    monkeypatch.setattr(streams, "HANDSHAKE_TIMEOUT_S", 0.3)
    endpoint = _tcp_endpoint()

    async def main() -> str:
        monkeypatch.delenv(streams.SECRET_ENV, raising=False)
        server = await streams.serve(endpoint, lambda _l, _b: None)
        monkeypatch.setenv(streams.SECRET_ENV, "s3cret")
        try:
            await streams.connect(endpoint, lambda _l, _b: None)
        except ConnectionRefusedError as exc:
            return str(exc)
        finally:
            server.close()
        return "connected"

    assert "did not authenticate in time" in uvloop.run(main())


def test_a_silent_peer_is_disconnected_after_the_handshake_timeout(monkeypatch):
    monkeypatch.setattr(streams, "HANDSHAKE_TIMEOUT_S", 0.2)
    monkeypatch.setenv(streams.SECRET_ENV, "s3cret")
    endpoint = _tcp_endpoint()
    host, port = streams.parse_endpoint(endpoint)

    async def main() -> float:
        server = await streams.serve(endpoint, lambda _l, _b: None)
        reader, writer = await asyncio.open_connection(host, port)
        start = asyncio.get_running_loop().time()
        data = await asyncio.wait_for(reader.read(), 5)
        assert data.startswith(b"DSPNAUTH")
        while data:
            data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        server.close()
        return asyncio.get_running_loop().time() - start

    assert uvloop.run(main()) < 2.0


def test_blocking_handshake_of_the_python_launcher(monkeypatch):
    import socket
    import threading

    monkeypatch.setenv(streams.SECRET_ENV, "s3cret")
    endpoint = _tcp_endpoint()
    host, port = streams.parse_endpoint(endpoint)
    errors: list = []

    def client(secret: bytes) -> None:
        with socket.create_connection((host, port), timeout=5) as sock:
            try:
                streams.authenticate_blocking(sock, secret)
                sock.sendall(framed(b"hello"))
                sock.recv(1)
            except OSError as exc:
                errors.append(exc)

    async def main() -> list:
        got: list = []

        def on_burst(link, burst) -> None:
            got.extend(burst)
            link.close()

        server = await streams.serve(endpoint, on_burst)
        for secret in (b"s3cret", b"nope"):
            thread = threading.Thread(target=client, args=(secret,))
            thread.start()
            while thread.is_alive():
                await asyncio.sleep(0.01)
        server.close()
        return got

    assert uvloop.run(main()) == [[b"hello"]]
    assert len(errors) == 1 and isinstance(errors[0], ConnectionRefusedError)
