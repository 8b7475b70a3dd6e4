"""Server-side CPU per unary gRPC call: Despina's hand-written HTTP/2 framing against the
``h2`` package's state machine (what hypercorn runs), in memory, in the same run.

Both servers are fed the same client bytes: the preface and SETTINGS once, then per call
one read holding a HEADERS frame (a warm HPACK block, as a client sends once its dynamic
table is warm) and a DATA frame with END_STREAM carrying a ~150-byte gRPC message. Each
server parses the frames, takes the message out of its 5-byte gRPC prefix, answers with
a canned response (HEADERS, DATA, trailers) and hands its output to a transport that
only counts bytes. No sockets, no model: this is the framing's own cost, the part a
choice between the two would change.

(a) ``h2server._Connection.data_received`` with a ``MethodHandler.start`` that answers
    at once (the ModelInfer path: no task, no coroutine);
(b) ``h2.connection.H2Connection(client_side=False)``: ``receive_data``, the events
    (RequestReceived, DataReceived, StreamEnded), ``acknowledge_received_data``,
    ``send_headers`` / ``send_data`` / ``send_headers(end_stream=True)`` and
    ``data_to_send``, as an asyncio server built on it does per call.

Run: ``.venv/bin/python loadtest/h2_statemachine.py [--calls N] [--rounds R]``. Prints
µs of process CPU per call for each (the median of the rounds) and their ratio. Needs
the ``h2`` package (the test extra installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from hpack import Encoder

from despina.services.frontend.grpc import h2server as lean

PATH = "/inference.GRPCInferenceService/ModelInfer"
HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", PATH),
    (":authority", "127.0.0.1:8001"),
    ("te", "trailers"),
    ("content-type", "application/grpc"),
    ("user-agent", "grpc-python/1.66.0 grpc-c/43.0.0 (linux; chttp2)"),
    ("grpc-accept-encoding", "identity, deflate, gzip"),
]
MESSAGE = bytes(range(150))
RESPONSE = bytes(range(120))


def _frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    return lean._frame(kind, flags, sid, payload)


def client_reads(calls: int) -> tuple[bytes, list[bytes]]:
    """The connection's first bytes, then one read per call (stream ids 1, 3, 5...)."""
    encoder = Encoder()
    # The client's windows are as large as HTTP/2 allows: no call waits for an update.
    window = lean.MAX_WINDOW
    settings = lean.INITIAL_WINDOW_SIZE.to_bytes(2, "big") + window.to_bytes(4, "big")
    first = (
        lean.PREFACE
        + _frame(lean.SETTINGS, 0, 0, settings)
        + _frame(lean.WINDOW_UPDATE, 0, 0, (window - 65535).to_bytes(4, "big"))
    )
    body = b"\x00" + len(MESSAGE).to_bytes(4, "big") + MESSAGE
    reads = []
    for i in range(calls):
        sid = 2 * i + 1
        block = encoder.encode(HEADERS)
        reads.append(
            _frame(lean.HEADERS, lean.END_HEADERS, sid, block)
            + _frame(lean.DATA, lean.END_STREAM, sid, body)
        )
    return first, reads


class _Sink:
    """A transport that keeps nothing: counts what is written."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data) -> None:
        self.written += len(data)

    def writelines(self, parts) -> None:
        for part in parts:
            self.written += len(part)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default


def run_lean(first: bytes, reads: list[bytes]) -> tuple[float, int]:
    """(a): CPU seconds for the calls, bytes written."""

    def start(request: bytes, answer):
        answer(RESPONSE, lean.OK, "")
        return None

    handler = lean.MethodHandler(None, None, None, False, start)

    async def go() -> tuple[float, int]:
        server = lean.H2Server({PATH: handler}, 1 << 20, 1 << 20)
        conn = lean._Connection(server)
        sink = _Sink()
        conn.connection_made(sink)  # type: ignore[arg-type]
        conn.data_received(first)
        feed = conn.data_received
        started = time.process_time()
        for data in reads:
            feed(data)
        return time.process_time() - started, sink.written

    return asyncio.run(go())


def run_h2(first: bytes, reads: list[bytes]) -> tuple[float, int]:
    """(b): CPU seconds for the calls, bytes written."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, RequestReceived, StreamEnded

    conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    sink = _Sink()
    sink.write(conn.data_to_send())
    conn.receive_data(first)
    sink.write(conn.data_to_send())
    response = b"\x00" + len(RESPONSE).to_bytes(4, "big") + RESPONSE
    response_headers = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    trailers = [(b"grpc-status", b"0")]
    started = time.process_time()
    for data in reads:
        messages: dict[int, list] = {}
        for event in conn.receive_data(data):
            if isinstance(event, RequestReceived):
                path = dict(event.headers).get(b":path")
                messages[event.stream_id] = [path]
            elif isinstance(event, DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                body = event.data
                if body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5:
                    messages[event.stream_id].append(body[5:])
            elif isinstance(event, StreamEnded):
                sid = event.stream_id
                conn.send_headers(sid, response_headers)
                conn.send_data(sid, response)
                conn.send_headers(sid, trailers, end_stream=True)
        sink.write(conn.data_to_send())
    return time.process_time() - started, sink.written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    first, reads = client_reads(args.calls)
    lean_us, h2_us = [], []
    for _ in range(args.rounds):
        seconds, written = run_lean(first, reads)
        assert written > args.calls * len(RESPONSE), written
        lean_us.append(seconds / args.calls * 1e6)
        seconds, written = run_h2(first, reads)
        assert written > args.calls * len(RESPONSE), written
        h2_us.append(seconds / args.calls * 1e6)
    a, b = statistics.median(lean_us), statistics.median(h2_us)
    print(f"calls per round: {args.calls}, rounds: {args.rounds} (median of the rounds)")
    print(f"(a) h2server (hand-written) : {a:7.1f} µs CPU per unary call")
    print(f"(b) h2 package state machine: {b:7.1f} µs CPU per unary call")
    print(f"h2 / hand-written: {b / a:.1f}x")


if __name__ == "__main__":
    main()
