"""Which backend hosts still run: their heartbeats, and the hosts that fell silent.

Each backend host sends ``Heartbeat`` every ``--host-heartbeat-interval-ms`` from a
thread of its own on a stream of its own (services/backend_host/heartbeat.py), so a long
model execution holding the host's loop does not stop it, and a SIGSTOP, a crash or a
hung machine does. ``Liveness`` notes when each host id last beat and, on a timer, hands
a host that has beaten once and then said nothing for ``--host-heartbeat-timeout-ms`` to
``on_silent`` (placement.Placement.host_silent: its stream is closed and it is gone as
if it had exited). A host that never beats (the Python launcher, which runs no model, or
an older host) is watched by its stream alone.

False positives: the timer runs on the scheduler's loop, and beats read before it in the
same loop iteration count; when the timer itself runs late (the scheduler was held up
longer than a check interval) the round declares nothing and every host gets the time
again, since their beats may be waiting unread in the sockets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from despina.services.scheduler.placement import Host, Hosts

log = logging.getLogger("despina.scheduler")


class Liveness:
    """Owns the last-beat table (host id -> time.monotonic()) and the check timer. Runs
    on the loop's thread only."""

    def __init__(
        self, hosts: Hosts, on_silent: Callable[[Host, float], None], timeout_s: float
    ) -> None:
        """``on_silent(host, silent_s)``: the host said nothing for ``silent_s`` seconds.
        ``timeout_s`` 0: never declare a host gone for its silence."""
        self.hosts = hosts
        self.on_silent = on_silent
        self.timeout_s = timeout_s
        self.check_every_s = min(0.25, timeout_s / 4) if timeout_s > 0 else 0.0
        self.seen: dict[str, float] = {}
        self._last_check = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.timeout_s > 0:
            self._last_check = time.monotonic()
            self._timer = asyncio.get_running_loop().call_later(self.check_every_s, self.check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def beat(self, host_id: str) -> None:
        self.seen[host_id] = time.monotonic()

    def check(self) -> None:
        """Declare gone every host silent for longer than the timeout, then run again."""
        now = time.monotonic()
        late = now - self._last_check > 2 * self.check_every_s + 0.1
        self._last_check = now
        try:
            if late:  # the scheduler was held up: its sockets may hold unread beats
                for host_id in self.seen:
                    self.seen[host_id] = max(self.seen[host_id], now - self.check_every_s)
                return
            silent = []
            for host in self.hosts.values():
                last = self.seen.get(host.host_id)
                if last is not None and now - last > self.timeout_s:
                    silent.append((host, now - last))
            for host, silent_s in silent:
                self.seen.pop(host.host_id, None)  # it beats again if it comes back
                self.on_silent(host, silent_s)
            self._forget_departed(now)
        except Exception:  # a failed round must not stop the next ones
            log.exception("checking the backend hosts' heartbeats failed")
        finally:
            self._timer = asyncio.get_running_loop().call_later(self.check_every_s, self.check)

    def _forget_departed(self, now: float) -> None:
        """Drop the beats of host ids no host has and that stopped long ago (hosts that
        exited), so the table stays as large as the fleet."""
        if len(self.seen) <= len(self.hosts):
            return
        current = {host.host_id for host in self.hosts.values()}
        for host_id, last in list(self.seen.items()):
            if host_id not in current and now - last > 10 * self.timeout_s:
                del self.seen[host_id]
