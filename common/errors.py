"""One error vocabulary for every Despina service.

A ``ServerError`` carries one of Triton's status codes and a message meant for the
user. It crosses process boundaries as data (``messages.Error``), never pickled, and is
mapped to an HTTP or gRPC status only at the protocol edge, by one table each.
"""

from __future__ import annotations

import enum


class Code(str, enum.Enum):
    """Triton's error codes (TRITONSERVER_Error_Code), spelled as Triton logs them."""

    UNKNOWN = "UNKNOWN"
    INTERNAL = "INTERNAL"
    NOT_FOUND = "NOT_FOUND"
    INVALID_ARG = "INVALID_ARG"
    UNAVAILABLE = "UNAVAILABLE"
    UNSUPPORTED = "UNSUPPORTED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


class ServerError(Exception):
    """An error scoped to one request or one operation; the server keeps serving.

    ``code`` says what kind of failure it is; ``message`` says what to fix.
    """

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ServerError({self.code.value}, {self.message!r})"


def invalid_arg(message: str) -> ServerError:
    return ServerError(Code.INVALID_ARG, message)


def not_found(message: str) -> ServerError:
    return ServerError(Code.NOT_FOUND, message)


def unavailable(message: str) -> ServerError:
    return ServerError(Code.UNAVAILABLE, message)


# Triton's refusal of a decoupled model's request outside a gRPC stream, in ModelInfer's
# words (the Python backend answers it; the HTTP frontend says "HTTP end point" instead).
DECOUPLED_UNARY = "ModelInfer RPC doesn't support models with decoupled transaction policy"


def unsupported(message: str) -> ServerError:
    return ServerError(Code.UNSUPPORTED, message)


def internal(message: str) -> ServerError:
    return ServerError(Code.INTERNAL, message)
