"""What one HTTP/1.1 frontend accepts from its clients (issue #12): body, header and URL
sizes, how long a request may take to arrive and a connection may sit idle, how many
connections it serves and how much shared memory announced-but-unsent bodies may hold.

Both transports (``lean.py``, ``app.py``) read one ``HttpLimits``; the flags that set it
are ``services/flags.py``'s ``HTTP_FLAGS``. Refusals are answered as Triton answers
errors, ``{"error": "..."}``, and never cost more than the bytes a client has sent.
"""

from __future__ import annotations

import argparse
import logging
import resource
from dataclasses import dataclass

log = logging.getLogger("despina.frontend")

# Triton's HTTP_DEFAULT_MAX_INPUT_SIZE (src/common.h): 64 MiB.
MAX_INPUT_SIZE = 64 * 1024 * 1024
MAX_HEADER_SIZE = 64 * 1024
MAX_URL_SIZE = 8 * 1024
MAX_HEADER_COUNT = 100  # Apache's LimitRequestFields
HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 75.0  # nginx's keepalive_timeout
MAX_PENDING_BODY_BYTES = 256 * 1024 * 1024
# File descriptors the frontend keeps for itself when the connection cap is derived from
# RLIMIT_NOFILE: gRPC connections, links to the scheduler and backend hosts, segments.
_RESERVED_FDS_SHARE = 2


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The limits of one frontend's HTTP server; ``0`` for ``max_connections`` means
    "derive from the open-file limit" (``resolve``)."""

    max_input_size: int = MAX_INPUT_SIZE
    max_header_size: int = MAX_HEADER_SIZE
    max_url_size: int = MAX_URL_SIZE
    max_header_count: int = MAX_HEADER_COUNT
    header_timeout: float = HEADER_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    max_connections: int = 0
    max_pending_body_bytes: int = MAX_PENDING_BODY_BYTES

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HttpLimits:
        """The limits a parsed ``despina frontend`` command line sets (``HTTP_FLAGS``)."""
        return cls(
            max_input_size=args.http_max_input_size,
            max_header_size=args.http_max_header_size,
            max_url_size=args.http_max_url_size,
            max_header_count=args.http_max_header_count,
            header_timeout=args.http_header_timeout_secs,
            idle_timeout=args.http_idle_timeout_secs,
            max_connections=args.http_max_connections,
            max_pending_body_bytes=args.http_max_pending_body_bytes,
        )

    def connection_cap(self) -> int:
        """``max_connections``, or when 0 half the process's open-file limit (the other
        half stays for gRPC and the frontend's own links), at least 64."""
        if self.max_connections > 0:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        return max(64, soft // _RESERVED_FDS_SHARE)

    @property
    def sweep_period(self) -> float:
        """How often the timeouts are checked: a timeout fires within one period of its
        time, at most 1 s late."""
        return max(0.05, min(1.0, self.header_timeout / 4, self.idle_timeout / 4))


def too_large_message(size: int | None, limit: int) -> str:
    """Triton's wording for a body over --http-max-input-size (its http_server.cc);
    ``size`` None where it is not known (a chunked body)."""
    of = "" if size is None else f" of {size} bytes"
    return (
        f"Request body size{of} exceeds the maximum allowed value of {limit} bytes. "
        "Use --http-max-input-size to increase the limit."
    )


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (common practice for servers: the
    soft default of 1024 is too few for many clients); returns the soft limit now. Never
    raises: where the limit cannot be changed it stays as it is."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        return soft
    except (OSError, ValueError) as exc:
        log.warning("could not raise the open-file limit: %s", exc)
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
