"""A lean HTTP/2 transport for gRPC on the frontend's event loop: the plaintext server.

It serves gRPC when nothing needs gRPC core (no TLS, no response compression, keepalive
settings at Triton's defaults), since grpc.aio costs several times its CPU per call
(docs/architecture.md#h2-why-its-own-http2); ``server.start_server`` picks grpc.aio
otherwise, and ``DESPINA_GRPC_TRANSPORT=grpcio`` forces it.

One module a job:

- ``frames``: HTTP/2's wire vocabulary (frame types, flags, settings, error codes) and
  the functions that write a frame. Pure.
- ``headers``: HPACK header blocks: the ones sent, pre-encoded; the ones received,
  decoded, checked (RFC 9113 8.2, 8.3) and cached (``HeaderDecoder``, one a connection).
- ``messages``: gRPC messages: statuses, compressed messages inflated in steps.
- ``calls``: what the servicer registers (``MethodHandler``) and sees (``CallContext``),
  one stream's state (``Stream``), and ``Calls``, which runs one connection's calls.
- ``connection``: ``H2Connection``, the asyncio Protocol: frames in, control frames,
  the stream table, flow control both ways, flood limits, frames out.
- ``server``: ``H2Server``: listens, shares methods and limits, counts calls, stops.

What it implements: HTTP/2 (RFC 9113) as a server (the preface, SETTINGS, PING,
WINDOW_UPDATE, RST_STREAM, GOAWAY, CONTINUATION, padding; flow control both ways, a peer
that sends past a window it was granted refused with FLOW_CONTROL_ERROR); HPACK (RFC 7541)
with ``hpack``; the limits against hostile peers that docs/security.md lists; RFC 9113's
connection and stream errors; gRPC over it: unary and bidirectional-streaming calls,
compressed requests, ``grpc-timeout`` deadlines, the receive and send size limits,
cancellation by RST_STREAM, a deadline or a closed connection (what the call waits on is
cancelled, which cancels the request downstream), statuses in trailers (Trailers-Only for
calls that fail before answering), UNIMPLEMENTED for unknown methods, HTTP 415 for a
request that is no gRPC.

Handlers are called as grpc.aio calls them, ``handler(request, context)``, with a context
whose ``abort`` ends the call with a status; a unary method that can also be started
without a coroutine (``MethodHandler.start``: ModelInfer) is, in the frame parser.
"""

from __future__ import annotations

from despina.services.frontend.grpc.h2.calls import CallContext, MethodHandler
from despina.services.frontend.grpc.h2.server import MAX_CONCURRENT_STREAMS_DEFAULT, H2Server

__all__ = ["MAX_CONCURRENT_STREAMS_DEFAULT", "CallContext", "H2Server", "MethodHandler"]
