"""Header blocks (HPACK, RFC 7541): the blocks this server sends, pre-encoded, and the
request blocks it receives, decoded, checked (RFC 9113 8.2 and 8.3) and cached."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple
from urllib.parse import quote

from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError

from despina.services.frontend.grpc.h2.frames import (
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    H2ConnectionError,
)

# SETTINGS_MAX_HEADER_LIST_SIZE, advertised (gRPC core's hard default): a request whose
# header list is larger ends with RESOURCE_EXHAUSTED; one past HARD_HEADER_LIST (or a
# header block, or any frame but DATA, that long) ends the connection with
# ENHANCE_YOUR_CALM, since HPACK's state must be kept or the connection dropped.
MAX_HEADER_LIST = 16 << 10
HARD_HEADER_LIST = 2 * MAX_HEADER_LIST
# The cache of decoded header blocks (HeaderDecoder): its keys and values in bytes, and
# the largest block it keeps (a warm client's block is a few dozen bytes).
HEADER_CACHE_BYTES = 64 << 10
HEADER_CACHE_BLOCK = 1 << 10

_ACCEPT_ENCODING = b"identity,deflate,gzip"
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
# Characters no field value may hold (RFC 9113 8.2.1): the request is malformed.
_BAD_VALUE = re.compile(rb"[\r\n\x00]")


# --- blocks this server sends -------------------------------------------------------------


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with ``first``'s bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman coding."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


# :status 200 (static index 8), then content-type and grpc-accept-encoding as literals.
RESPONSE_HEADERS = (
    b"\x88"
    + literal(b"content-type", b"application/grpc")
    + literal(b"grpc-accept-encoding", _ACCEPT_ENCODING)
)
OK_TRAILERS = literal(b"grpc-status", b"0")
# A request that is no gRPC: HTTP 415 (gRPC over HTTP/2, "Requests"); ":status" is static
# index 8, its value a literal.
UNSUPPORTED_MEDIA = b"\x08\x03415" + literal(b"content-type", b"text/plain")


def status_block(code: int, message: str, with_headers: bool) -> bytes:
    """Trailers with a gRPC status (and the response headers before them when
    ``with_headers``: Trailers-Only)."""
    block = RESPONSE_HEADERS if with_headers else b""
    block += literal(b"grpc-status", str(code).encode())
    if message:
        # grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2, "Responses").
        block += literal(
            b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()
        )
    return block


# --- blocks this server receives ----------------------------------------------------------


class Head(NamedTuple):
    """What a header block says, checked once per distinct block (and cached with it)."""

    path: str
    content_type: bytes
    encoding: str
    timeout: float | None
    bad_timeout: bool  # a grpc-timeout that is no 1-8 digits and a unit
    request_error: bool  # no well-formed request (RFC 9113 8.1.1: a stream PROTOCOL_ERROR)
    trailer_error: bool  # no well-formed trailers (pseudo-headers, or malformed fields)
    size: int  # the header list's size as RFC 9113 counts it (32 bytes a field more)
    fields: dict[bytes, bytes] | None = None  # the first value of each wanted field


def grpc_timeout(value: bytes) -> float | None:
    """A grpc-timeout in seconds: 1 to 8 ASCII digits and a unit; None if malformed."""
    digits = value[:-1]
    unit = _TIMEOUT_UNITS.get(value[-1:])
    if unit is None or not 0 < len(digits) <= 8 or not digits.isdigit():
        return None
    return int(digits) * unit


def parse_head(
    headers: Iterable,
    wanted: frozenset[bytes] = frozenset(),
    forward: re.Pattern[str] | None = None,
) -> Head:
    """The gRPC fields of a decoded header list (and the first value of each field named
    in ``wanted`` or whose name ``forward`` matches), and whether it is a well-formed
    request or trailers (RFC 9113 8.2 and 8.3: field names in lower case and not
    connection-specific, values without CR, LF or NUL, pseudo-headers known, once each
    and first). Pure."""
    fields: dict[bytes, bytes] | None = {} if wanted or forward is not None else None
    path = content_type = b""
    encoding = ""
    timeout: float | None = None
    bad_timeout = malformed = regular = False
    seen: set[bytes] = set()
    size = 0
    bad_value = _BAD_VALUE.search
    for name, value in headers:
        size += len(name) + len(value) + 32
        if bad_value(value) is not None:
            malformed = True
        if name[:1] == b":":
            if regular or name not in _REQUEST_PSEUDO or name in seen:
                malformed = True
            elif not value and name != b":authority":
                malformed = True
            seen.add(name)
            if name == b":path":
                path = value
            continue
        regular = True
        if name.lower() != name or name in _CONNECTION_SPECIFIC:
            malformed = True
        elif name == b"te":
            malformed = malformed or value != b"trailers"
        elif name == b"content-type":
            content_type = value
        elif name == b"grpc-encoding":
            encoding = value.decode("latin-1")
        elif name == b"grpc-timeout":
            timeout = grpc_timeout(value)
            bad_timeout = timeout is None
        elif fields is not None and name not in fields:
            if name in wanted or (
                forward is not None and forward.search(name.decode("latin-1")) is not None
            ):
                fields[name] = value
    complete = b":method" in seen and b":scheme" in seen and b":path" in seen
    return Head(
        path.decode("latin-1"),
        content_type,
        encoding,
        timeout,
        bad_timeout,
        malformed or not complete,
        malformed or bool(seen),
        size,
        fields,
    )


class HeaderDecoder:
    """One connection's request header blocks: owns its HPACK decoder (whose dynamic
    table every block must pass through, in order) and the cache of decoded blocks.
    Not safe across threads; one per connection."""

    __slots__ = ("decoder", "heads", "heads_bytes", "wanted", "forward")

    def __init__(self, wanted: frozenset[bytes], forward: re.Pattern[str] | None) -> None:
        self.decoder = Decoder()
        self.decoder.max_header_list_size = HARD_HEADER_LIST
        self.heads: dict[bytes, Head] = {}
        self.heads_bytes = 0
        self.wanted = wanted
        self.forward = forward

    def decode(self, block: bytes) -> Head:
        """The block decoded and checked. A block that leaves the decoder's dynamic table
        as it was (indexed fields and literals not indexed: what a client sends once its
        table is warm) decodes the same way until a block that changes the table comes:
        those are cached, up to HEADER_CACHE_BYTES. Raises H2ConnectionError:
        ENHANCE_YOUR_CALM past HARD_HEADER_LIST, COMPRESSION_ERROR for a bad block (the
        decoder's state is then lost, so the connection must end)."""
        head = self.heads.get(block)
        if head is not None:
            return head
        table = self.decoder.header_table
        entries = table.dynamic_entries
        count, first, size = len(entries), entries[0] if entries else None, table.maxsize
        try:
            headers = self.decoder.decode(block, raw=True)
        except OversizedHeaderListError:
            raise H2ConnectionError(ENHANCE_YOUR_CALM) from None
        except HPACKError:
            raise H2ConnectionError(COMPRESSION_ERROR) from None
        head = parse_head(headers, self.wanted, self.forward)
        # An insertion puts a new entry first (compared by identity, not value).
        newest = entries[0] if entries else None
        if len(entries) == count and newest is first and table.maxsize == size:
            cost = len(block) + head.size
            if len(block) <= HEADER_CACHE_BLOCK and self.heads_bytes + cost <= HEADER_CACHE_BYTES:
                self.heads[block] = head
                self.heads_bytes += cost
        else:
            self.heads.clear()
            self.heads_bytes = 0
        return head
