"""One inference call, from the request its protocol decoded to the last byte of its
answer: ``InferCall``.

A call owns every buffer its request holds on the way (docs/architecture.md, "Who owns
which buffer"):

- ``body``: the shared-memory block the request body was read into (HTTP transports
  read a large body straight into the frontend's arena), until the wire takes it;
- ``blocks``: the frontend arena blocks that carry its inputs to the backend host (the
  body block among them once taken), freed when the reply or error arrives, which is
  when the host is done reading them, even if the client went away before;
- ``leases``: the backend host's arena blocks its outputs are read from in place,
  given back once the protocol has copied them into its response.

``close()`` frees what the call still holds, once, whatever happened (answered, failed,
client gone, cancelled): every protocol handler calls it in one place, after encoding,
and nothing else frees a call's buffers. The call is the future of its result: awaiting
it gives the ``InferenceResult`` or raises ``ServerError``; cancelling it (a closed
connection, RST_STREAM, a deadline) tells whoever holds the request, the scheduler or a
backend host, so it is dropped there if it has not started.

What comes next fits here (docs/architecture.md, "What the call is built for"): several
responses per request (decoupled models, streams) as a queue of results on the call;
cancellation already travels down; a sequence's correlation id and slot, an ensemble
step's or BLS call's parent call, and per-stage timestamps are fields of the call that
the wire carries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING

from despina.common.errors import Code, ServerError
from despina.common.stats import CANCELED, OTHER, SUCCESS_ROWS

if TYPE_CHECKING:
    from despina.services.frontend.inference import InferenceRequest
    from despina.services.frontend.placement import BodyBlock
    from despina.services.frontend.routes import Target
    from despina.services.frontend.scheduler_client import SchedulerClient


class InferCall(asyncio.Future):
    __slots__ = (
        "_client",
        "body",
        "request",
        "rid",
        "blocks",
        "targets",
        "target",
        "sent",
        "leases",
        "t0",
        "t_sent",
        "t_reply",
        "reason",
        "trace",
        "proto",
        "traced",
    )

    # A call on a stream takes several responses (``StreamCall``); this one, one.
    stream = False

    def __init__(self, client: SchedulerClient, body: BodyBlock | None = None) -> None:
        super().__init__(loop=client.loop)
        self._client = client
        self.body = body
        self.request: InferenceRequest | None = None
        self.rid = 0  # set once sent: the key of its reply
        self.blocks: list[tuple[str, int]] = []
        self.targets: frozenset[str] | set[str] = frozenset()  # outputs to client regions
        self.target: Target | None = None  # the instance, when sent there directly
        # A direct request as sent (scheduler_client._Direct), kept to send it once more
        # to another host should its host be lost; None once sent again.
        self.sent: object | None = None
        self.leases: list[tuple[object, str, int]] = []  # (host link, key, offset)
        # Statistics (common/stats.py): when the call began (0.0: not counted), and why
        # it failed where the error alone does not say (Triton's reasons).
        self.t0 = monotonic() if client.stats is not None else 0.0
        # Its request sent, its result read (when counted; t_reply set only with a result).
        self.t_sent = self.t_reply = 0.0
        self.reason = ""
        # A traced request's wire stamps (services/frontend/trace.py): the list it is sent
        # with (``Infer.trace``), then the reply's. None: not traced.
        self.trace: list | None = None
        # Set by a protocol only while tracing is on, for a protocol that reports its
        # answer's send (``DataPlane.trace_sent``): its receive stamps, as (Triton activity,
        # wall-clock ns); None once the call is not traced. ``traced``: the finished trace
        # record waiting for that report.
        self.proto: list | None = None
        self.traced: tuple | None = None

    def cancel(self, msg: object = None) -> bool:
        if not super().cancel(msg):
            return False
        if self.rid:
            self._client.cancelled(self)
        return True

    def close(self) -> None:
        """Free what the call still holds: its output leases, and its body block when
        the wire never took it. Idempotent; the input blocks the wire holds are freed
        when the reply comes, not here."""
        client = self._client
        t0 = self.t0
        if t0:
            self.t0 = 0.0
            if self.t_reply:  # resolved with a result: a success, counted on its own times
                # Recorder.success, inline: one call fewer on every request.
                result = self.result()
                stats = client.stats
                rows = stats.successes  # type: ignore[union-attr]
                if not rows:
                    stats.arm()  # type: ignore[union-attr]
                rows += (result.model, result.version, t0, self.t_sent, self.t_reply, monotonic())
                if len(rows) >= SUCCESS_ROWS:
                    stats.count_queued()  # type: ignore[union-attr]
            else:
                self._count_failure(client, t0)
        if self.leases:
            client.release_leases(self.leases)
            self.leases = []
        body = self.body
        if body is not None:
            self.body = None
            if not body.taken:
                body.taken = True
                client.arena.release(body.key, body.offset)

    def _count_failure(self, client: SchedulerClient, t0: float) -> None:
        """Count the call, which did not end with a result, once in its frontend's
        statistics: a failure with Triton's reason (CANCELED, BACKEND: a host's reply;
        REJECTED: refused before any host, or OTHER). A call never sent (its request did
        not decode) is not counted; nor is one still pending without a reason."""
        request = self.request
        stats = client.stats
        if request is None or stats is None:
            return
        ns = int((monotonic() - t0) * 1e9)
        if self.cancelled():
            stats.request(request.model, request.version, ns, CANCELED)
        elif self.done():  # failed
            code = getattr(self.exception(), "code", None)
            reason = CANCELED if code is Code.CANCELLED else (self.reason or OTHER)
            stats.request(request.model, request.version, ns, reason)
        elif self.reason:
            stats.request(request.model, request.version, ns, self.reason)


# The most bytes of a stream's responses that may wait, encoded, for a client that does
# not read them (gRPC ModelStreamInfer, HTTP generate_stream): past it the requests are
# cancelled (their model told), not held in memory.
MAX_UNREAD_BYTES = 16 << 20


class Unread:
    """The bytes of a stream's responses queued for its client and not yet written (the
    transport takes each once the client has read enough), held to ``MAX_UNREAD_BYTES``:
    past it the owner cancels the stream's requests and ends it with ``error()``."""

    __slots__ = ("bytes", "over")

    def __init__(self) -> None:
        self.bytes = 0
        self.over = False  # past the bound: what comes after is dropped

    def queued(self, n: int) -> bool:
        """``n`` more bytes queued; True the one time they pass the bound."""
        self.bytes += n
        if self.bytes > MAX_UNREAD_BYTES and not self.over:
            self.over = True
            return True
        return False

    def written(self, n: int) -> None:
        self.bytes -= n

    @staticmethod
    def error() -> ServerError:
        """The error that ends a stream whose client left too much unread."""
        return ServerError(
            Code.UNAVAILABLE,
            f"the client left more than {MAX_UNREAD_BYTES >> 20} MiB of responses unread: "
            "its request(s) were cancelled",
        )


class StreamCall(InferCall):
    """A call on a stream (gRPC ``ModelStreamInfer``), which a decoupled model may answer
    with several responses: each one that is not the last is handed to
    ``on_response(call, response)`` (an ``InferenceResult``, or the ``ServerError`` of an
    error response) on the loop,
    in the order sent, as it arrives; the last one resolves the call as any call's
    reply does. A model that ends with the FINAL flag alone (no response) resolves it
    to an ``InferenceResult`` without outputs and ``empty_final`` set. ``responses``
    counts the responses delivered (statistics' ``response_stats``)."""

    __slots__ = ("on_response", "empty_final", "responses", "t_part", "host")

    stream = True

    def __init__(
        self,
        client: SchedulerClient,
        on_response: Callable[[StreamCall, object], None],
        body: BodyBlock | None = None,
    ) -> None:
        super().__init__(client, body)
        self.on_response = on_response
        self.empty_final = False
        self.responses = 0
        self.t_part = self.t0  # when the previous response arrived (statistics)
        # The link of the backend host its responses come from (a scheduled request's
        # Cancel goes there once its execution has ended).
        self.host: object | None = None
