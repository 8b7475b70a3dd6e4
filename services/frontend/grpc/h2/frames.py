"""HTTP/2's wire vocabulary (RFC 9113 sections 4, 6 and 7): frame types, flags, SETTINGS
identifiers, error codes, the client preface, and the functions that write a frame.
Pure: no state, no I/O."""

from __future__ import annotations

from typing import Any

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# SETTINGS identifiers
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 5, 6

# Error codes (RFC 9113 section 7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

MAX_FRAME = 2**24 - 1  # the largest frame the peer may send us (SETTINGS_MAX_FRAME_SIZE)


class H2ConnectionError(Exception):
    """A connection error (RFC 9113 5.4.1): raised by a frame handler, answered by the
    connection with GOAWAY ``code`` and a close."""

    def __init__(self, code: int) -> None:
        self.code = code


def frame(kind: int, flags: int, stream: int, payload: bytes | memoryview = b"") -> bytes:
    """One whole frame, its payload copied in."""
    n = len(payload)
    return (
        bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, kind, flags))
        + stream.to_bytes(4, "big")
        + bytes(payload)
    )


def frame_header(kind: int, flags: int, stream: int, n: int) -> bytes:
    """The 9-byte header of a frame whose ``n``-byte payload is written after it."""
    return bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, kind, flags)) + stream.to_bytes(4, "big")


def unpad(flags: int, payload: Any) -> Any:
    """A DATA or HEADERS payload without its padding (RFC 9113 6.1); raises
    H2ConnectionError PROTOCOL_ERROR when the padding is longer than the payload."""
    if flags & PADDED:
        if not payload:
            raise H2ConnectionError(PROTOCOL_ERROR)
        pad = payload[0]
        if pad >= len(payload):
            raise H2ConnectionError(PROTOCOL_ERROR)
        return payload[1 : len(payload) - pad]
    return payload
