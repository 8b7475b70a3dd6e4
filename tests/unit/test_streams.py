"""The framing of the data-plane streams (common/streams.py): every split of the bytes
into reads gives the same messages, in order; a real unix socket carries large ones."""

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
