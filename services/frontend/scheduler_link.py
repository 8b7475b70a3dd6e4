"""The frontend's link to the scheduler, picked by its endpoint's scheme
(``connect_scheduler``, a factory as vLLM's ``make_client`` picks its client): a plain
stream for ``unix://`` and ``tcp://`` (one thread wake-up per hop, measured ten times
cheaper than libzmq on this kind of machine: docs/architecture.md, "The wire"), or a
ZeroMQ DEALER socket for ``ipc://`` and ``zmq+tcp://``. Both send a list of frames and
report bursts of received messages; a link that breaks is connected again, with the
hello said again (``on_connected``), and while it is down sends fail: the scheduler
client (scheduler_client.py) fails what it had sent, holds new requests a while for the
link to come back, and registers its client shared-memory regions again on the new link.
A ZeroMQ link reconnects inside libzmq; its socket monitor says when it went and came
back (``ZmqToScheduler``), so the same happens over it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from despina.common import streams

log = logging.getLogger("despina.frontend")


class SchedulerLink(Protocol):
    def send(self, frames: list) -> bool: ...

    def close(self) -> None: ...


def zeromq_endpoint(endpoint: str) -> str | None:
    """The ZeroMQ address when ``endpoint`` asks for ZeroMQ (``ipc://path`` or
    ``zmq+tcp://host:port``); None for a stream endpoint (``unix://path``, ``tcp://...``)."""
    if endpoint.startswith("ipc://"):
        return endpoint
    if endpoint.startswith("zmq+tcp://"):
        return endpoint[4:]
    return None


async def connect_scheduler(
    endpoint: str,
    on_burst: Callable[[list[list]], None],
    on_connected: Callable[[SchedulerLink], None],
    on_lost: Callable[[], None],
) -> SchedulerLink:
    """The link to the scheduler at ``endpoint``, connected; ``on_connected(link)`` runs
    each time it (re)connects (to say hello on it), ``on_lost`` each time it breaks."""
    zmq_endpoint = zeromq_endpoint(endpoint)
    if zmq_endpoint is None:
        link = StreamToScheduler(endpoint, on_burst, on_connected, on_lost)
        await link.start()
        return link
    # Imported only here: pyzmq costs every frontend ~5 MiB it would not use.
    import zmq

    from despina.common import transport

    dealer = transport.configure(transport.make_context().socket(zmq.DEALER))
    transport.secure(dealer, zmq_endpoint, server=False)
    zlink = ZmqToScheduler(dealer, zmq_endpoint, on_burst, on_connected, on_lost)
    dealer.connect(zmq_endpoint)
    on_connected(zlink)
    return zlink


class ZmqToScheduler:
    """The frontend's ZeroMQ DEALER to the scheduler. libzmq connects it again by itself
    when the scheduler goes (a restart); the socket's monitor (``EVENT_DISCONNECTED``,
    then ``EVENT_CONNECTED``) calls ``on_lost`` and ``on_connected`` as a stream's loss
    and reconnection do, so the hello is said and the regions registered again."""

    # It comes back after a loss, hello said again: a request may wait for it.
    reconnects = True

    def __init__(
        self,
        dealer: object,
        endpoint: str,
        on_burst: Callable[[list[list]], None],
        on_connected: Callable[[SchedulerLink], None],
        on_lost: Callable[[], None],
    ) -> None:
        import zmq

        from despina.common import transport

        self.endpoint = endpoint
        self._on_connected = on_connected
        self._on_lost = on_lost
        self._down = False
        self._driver = transport.SocketDriver(dealer, on_burst)  # type: ignore[arg-type]
        monitor = dealer.get_monitor_socket(  # type: ignore[attr-defined]
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
        )
        self._monitor = transport.SocketDriver(monitor, self._on_events)

    def _on_events(self, burst: list[list]) -> None:
        import zmq
        from zmq.utils.monitor import parse_monitor_message

        for frames in burst:
            event = parse_monitor_message(frames)["event"]
            if event == zmq.EVENT_DISCONNECTED and not self._down:
                self._down = True
                log.error("lost the scheduler at %s; reconnecting", self.endpoint)
                self._on_lost()
            elif event == zmq.EVENT_CONNECTED and self._down:
                self._down = False
                log.info("connected to the scheduler at %s again", self.endpoint)
                self._on_connected(self)

    def send(self, frames: list) -> bool:
        return self._driver.send(frames)

    def close(self) -> None:
        import zmq

        try:
            self._driver.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close()
        self._driver.close()


# The longest wait between two connection attempts to a lost scheduler: a restarted one
# is found within this of listening (an attempt to a closed port costs microseconds).
RECONNECT_MAX_S = 0.25


class StreamToScheduler:
    """The frontend's stream to the scheduler, connected again when it breaks."""

    # It comes back after a loss, hello said again: a request may wait for it.
    reconnects = True

    def __init__(
        self,
        endpoint: str,
        on_burst: Callable[[list[list]], None],
        on_connected: Callable[[SchedulerLink], None],
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._on_burst = on_burst
        self._on_connected = on_connected
        self._on_lost = on_lost
        self._link: streams.FramedProtocol | None = None
        self._task: asyncio.Task | None = None

    async def start(self, wait_s: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + wait_s
        while self._link is None:
            try:
                await self._connect()
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _connect(self) -> None:
        self._link = await streams.connect(
            self.endpoint, lambda _link, burst: self._on_burst(burst), self._lost
        )
        self._on_connected(self)

    def _lost(self, _link: streams.FramedProtocol) -> None:
        self._link = None
        log.error("lost the scheduler at %s; reconnecting", self.endpoint)
        if self._on_lost is not None:
            self._on_lost()
        self._task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.02
        while self._link is None:
            try:
                await self._connect()
            except OSError:
                await asyncio.sleep(delay)
                delay = min(RECONNECT_MAX_S, delay * 2)
        log.info("connected to the scheduler at %s again", self.endpoint)

    def send(self, frames: list) -> bool:
        return self._link is not None and self._link.send(frames)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._link is not None:
            link, self._link = self._link, None
            link._on_lost = None  # closing on purpose: no reconnect
            link.close()
