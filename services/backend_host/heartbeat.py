"""A backend host's heartbeat: a thread of its own sends ``Heartbeat`` to the scheduler
every ``--host-heartbeat-interval-ms`` on a stream of its own.

Why a thread and a stream of its own: a model's execute may hold the host's event loop
for as long as it computes (a lone instance runs on the loop, executor.py, and so does
a Python model in its instance process), and a heartbeat timed by the loop would then
make a healthy host look dead. The thread keeps beating while the loop computes
(numpy, ONNX Runtime and the GIL's switch interval let it run every few milliseconds);
what stops it is what stops the whole process: SIGSTOP, a crash, a hung or cut-off
machine. The stream is a second connection to the scheduler's host endpoint, written
only by this thread with blocking sends, so no lock is shared with the loop's stream and
no frame of the loop's messages can be cut by a heartbeat. What this does not catch is a
loop that is stuck while the process runs (a deadlock in a model): from outside it looks
like a long execution; the frontend's clients' own timeouts are the guard there.

The scheduler reads the stream like any other (the framing of common/streams.py: ``u32
frame count, u32 length`` then the frame); it never writes to it.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading

from despina.common import messages as m
from despina.common import streams

log = logging.getLogger("despina.backend_host")

# The default --host-heartbeat-interval-ms (and the scheduler's timeout, a few beats).
DEFAULT_INTERVAL_MS = 500
CONNECT_TIMEOUT_S = 2.0


class Heartbeat:
    """Owns one daemon thread and its socket to the scheduler. ``start``/``stop`` from
    any thread; the thread reconnects (at the interval) while the scheduler is away."""

    def __init__(self, scheduler_endpoint: str, host_id: str, interval_s: float) -> None:
        self.endpoint = scheduler_endpoint
        self.interval_s = interval_s
        payload = m.encoder().encode(m.Heartbeat(host_id))
        self._frame = struct.pack("<II", 1, len(payload)) + payload
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None or self.interval_s <= 0:
            return
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        sock: socket.socket | None = None
        while not self._stopped.is_set():
            if sock is None:
                sock = self._connect()
            if sock is not None:
                try:
                    sock.sendall(self._frame)
                except OSError as exc:
                    log.debug("heartbeat stream to %s lost: %s", self.endpoint, exc)
                    sock.close()
                    sock = None
            self._stopped.wait(self.interval_s)
        if sock is not None:
            sock.close()

    def _connect(self) -> socket.socket | None:
        """A blocking stream to the scheduler (authenticated when a cluster secret is
        set, as every TCP stream is), or None while it does not listen."""
        where, port = streams.parse_endpoint(self.endpoint)
        try:
            if port:
                sock = socket.create_connection((where, port), timeout=CONNECT_TIMEOUT_S)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if not port:
                    sock.settimeout(CONNECT_TIMEOUT_S)
                    sock.connect(where)
                secret = streams.cluster_secret() if port else None
                if secret is not None:
                    streams.authenticate_blocking(sock, secret)
            except OSError:
                sock.close()
                raise
        except OSError as exc:
            log.debug("heartbeat: scheduler not reachable at %s: %s", self.endpoint, exc)
            return None
        # A send that cannot leave in one interval (a full buffer: the scheduler is
        # stuck) fails, and the next beat reconnects.
        sock.settimeout(max(self.interval_s, 0.05))
        return sock
