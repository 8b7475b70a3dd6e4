"""The plaintext gRPC transport's old import path: the code lives in the ``h2`` package
(``services/frontend/grpc/h2/``, one module a job); these names stay importable for the
modules and experiments that import them from here."""

from __future__ import annotations

from despina.services.frontend.grpc.h2.calls import CallContext, MethodHandler
from despina.services.frontend.grpc.h2.connection import MAX_WINDOW
from despina.services.frontend.grpc.h2.connection import H2Connection as _Connection
from despina.services.frontend.grpc.h2.frames import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    PREFACE,
    SETTINGS,
    WINDOW_UPDATE,
)
from despina.services.frontend.grpc.h2.frames import frame as _frame
from despina.services.frontend.grpc.h2.messages import OK
from despina.services.frontend.grpc.h2.server import MAX_CONCURRENT_STREAMS_DEFAULT, H2Server

__all__ = [
    "DATA",
    "END_HEADERS",
    "END_STREAM",
    "HEADERS",
    "INITIAL_WINDOW_SIZE",
    "MAX_CONCURRENT_STREAMS_DEFAULT",
    "MAX_WINDOW",
    "OK",
    "PREFACE",
    "SETTINGS",
    "WINDOW_UPDATE",
    "CallContext",
    "H2Server",
    "MethodHandler",
    "_Connection",
    "_frame",
]
