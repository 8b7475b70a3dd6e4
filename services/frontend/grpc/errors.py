"""gRPC status codes, and the one table from Despina's error codes to them, as Triton
maps them.

``Status`` holds the codes' wire values (the ``grpc-status`` trailer), so the lean
transport needs no grpc import; the grpc.aio server turns them into ``grpc.StatusCode``.
"""

from __future__ import annotations

from enum import IntEnum

from despina.common.errors import Code, ServerError


class Status(IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


GRPC_STATUS = {
    Code.INTERNAL: Status.INTERNAL,
    Code.NOT_FOUND: Status.NOT_FOUND,
    Code.INVALID_ARG: Status.INVALID_ARGUMENT,
    Code.UNAVAILABLE: Status.UNAVAILABLE,
    Code.UNSUPPORTED: Status.UNIMPLEMENTED,
    Code.ALREADY_EXISTS: Status.ALREADY_EXISTS,
    Code.CANCELLED: Status.CANCELLED,
    Code.UNKNOWN: Status.UNKNOWN,
    Code.DEADLINE_EXCEEDED: Status.DEADLINE_EXCEEDED,
}


def status_of(exc: ServerError) -> tuple[Status, str]:
    """The one mapping of an error to what a gRPC call ends with: its status, its message."""
    return GRPC_STATUS.get(exc.code, Status.UNKNOWN), exc.message
