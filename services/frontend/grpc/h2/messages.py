"""gRPC's messages on a stream: compressed request messages inflated step by step, never
past the receive limit. Pure but for zlib's state; one ``Inflation`` per message."""

from __future__ import annotations

import zlib

# grpc-status codes
OK, CANCELLED_CODE, UNKNOWN_CODE, DEADLINE_CODE = 0, 1, 2, 4
RESOURCE_EXHAUSTED_CODE, UNIMPLEMENTED_CODE, INTERNAL_CODE = 8, 12, 13

# Bytes of inflated output per loop iteration (docs/architecture.md#h2-inflation-steps).
INFLATE_STEP = 4 << 20


class CallError(Exception):
    """One call ends with gRPC status ``code`` and ``message``; the connection serves on."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message


class Inflation:
    """One message of a stream on its way to its call: inflated step by step (or, for
    an uncompressed message queued behind a compressed one, passed through)."""

    __slots__ = ("data", "inflater", "chunks", "size")

    def __init__(self, data: bytes, encoding: str | None) -> None:
        """Raises CallError UNIMPLEMENTED for an unknown encoding."""
        self.data = data
        self.inflater = None if encoding is None else zlib.decompressobj(wbits(encoding))
        self.chunks: list[bytes] = []
        self.size = 0

    def step(self, limit: int) -> bytes | None:
        """Inflate up to INFLATE_STEP more bytes: the whole message once done, else None.
        Never more than ``limit`` + 1 bytes are produced (a compression bomb costs what
        the limit allows, no more). Raises CallError: RESOURCE_EXHAUSTED past ``limit``,
        INTERNAL for corrupt data."""
        if self.inflater is None:
            return self.data
        try:
            piece = self.inflater.decompress(self.data, min(INFLATE_STEP, limit + 1 - self.size))
        except zlib.error as exc:
            raise CallError(INTERNAL_CODE, f"Failed to decompress the message: {exc}") from None
        self.data = self.inflater.unconsumed_tail
        self.chunks.append(piece)
        self.size += len(piece)
        if self.size > limit:
            raise CallError(
                RESOURCE_EXHAUSTED_CODE,
                f"Received message larger than max (more than {limit} bytes once decompressed)",
            )
        if self.data or (piece and not self.inflater.eof):
            return None  # input left, or output that did not fit in this step
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)


def wbits(encoding: str) -> int:
    """zlib's window bits for a grpc-encoding; CallError UNIMPLEMENTED for others."""
    if encoding == "gzip":
        return 16 + zlib.MAX_WBITS
    if encoding == "deflate":
        return zlib.MAX_WBITS
    raise CallError(
        UNIMPLEMENTED_CODE, f"Compression algorithm '{encoding or 'identity'}' is disabled."
    )
