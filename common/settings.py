"""Each service's settings, read once at start-up from its flags and the environment,
then passed down to the objects that use them (constructor arguments): nothing below a
service's ``__main__`` reads an environment variable, except the cluster secret (a
credential, read by ``common/streams.py`` when a TCP link opens).

- ``SpeedPaths``: one switch per speed path, and ``--speed-paths=off`` /
  ``DESPINA_SPEED_PATHS=off`` for all of them (docs/architecture.md#speed-paths).
- ``ProcessSettings``: what every process of a cell shares (the shared-memory folder, the
  largest message on a link); ``apply`` sets the module values of ``common/shm/arena.py``
  and ``common/streams.py`` from it, once, before any arena or link exists.
- ``FrontendSettings``, ``HostSettings``, ``SchedulerSettings``: one per service.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

SPEED_PATHS_ENV = "DESPINA_SPEED_PATHS"
HTTP_TRANSPORT_ENV = "DESPINA_HTTP_TRANSPORT"
GRPC_TRANSPORT_ENV = "DESPINA_GRPC_TRANSPORT"
SHM_DIR_ENV = "DESPINA_SHM_DIR"
MAX_MESSAGE_BYTES_ENV = "DESPINA_MAX_MESSAGE_BYTES"
# on: every process counts (serve --allow-metrics=true sets it); unset or off: none does
STATISTICS_ENV = "DESPINA_STATISTICS"

# How long a lightly loaded process polls before it sleeps (common/busypoll.py): at
# concurrency 1 the next message comes within a few hundred µs here.
BUSY_POLL_US = 1000

SHM_DIR = "/dev/shm"  # as shm_open uses
MAX_MESSAGE_BYTES = 1 << 31

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def parse_switch(value: str, what: str) -> bool:
    """``on``/``off`` (or true/false, yes/no, 1/0) -> bool; raises ValueError naming
    ``what`` otherwise."""
    lowered = value.strip().lower()
    if lowered in _ON:
        return True
    if lowered in _OFF:
        return False
    raise ValueError(f"{what} must be on or off, got '{value}'")


@dataclass(frozen=True, slots=True)
class SpeedPaths:
    """Which speed paths a process takes (docs/architecture.md#speed-paths). Off, each
    takes the plain path: ``memo`` off decodes every request; ``burst`` off sends each
    message at once; ``busy_poll_us`` 0 never polls; ``loop_execution`` off runs every
    execution on its instance's thread; ``direct_routes`` off sends every request
    through the scheduler."""

    memo: bool = True
    burst: bool = True
    busy_poll_us: int = BUSY_POLL_US
    loop_execution: bool = True
    direct_routes: bool = True

    @classmethod
    def off(cls) -> SpeedPaths:
        return cls(False, False, 0, False, False)

    @property
    def busy_poll_s(self) -> float:
        return self.busy_poll_us / 1e6

    @classmethod
    def from_args(cls, args: object, environ: Mapping[str, str] = os.environ) -> SpeedPaths:
        """From the flags ``add_speed_paths`` declares: each path's own flag where it was
        given, else ``--speed-paths`` (else ``DESPINA_SPEED_PATHS``, else on) for all.
        Raises ValueError for a malformed ``DESPINA_SPEED_PATHS``."""
        every = getattr(args, "speed_paths", None)
        if every is None:
            every = parse_switch(environ.get(SPEED_PATHS_ENV) or "on", SPEED_PATHS_ENV)

        def pick(name: str) -> bool:
            value = getattr(args, name, None)
            return every if value is None else bool(value)

        poll = getattr(args, "busy_poll_us", None)
        return cls(
            memo=pick("request_memo"),
            burst=pick("burst_sends"),
            busy_poll_us=(BUSY_POLL_US if every else 0) if poll is None else int(poll),
            loop_execution=pick("loop_execution"),
            direct_routes=pick("direct_routes"),
        )

    def argv(self) -> list[str]:
        """As the flags of a service's command line (every path explicit)."""

        def text(on: bool) -> str:
            return "true" if on else "false"

        return [
            f"--request-memo={text(self.memo)}",
            f"--burst-sends={text(self.burst)}",
            f"--busy-poll-us={self.busy_poll_us}",
            f"--loop-execution={text(self.loop_execution)}",
            f"--direct-routes={text(self.direct_routes)}",
        ]

    def describe(self) -> str:
        """One log line's worth: which paths are on."""
        paths = {
            "request memo": self.memo,
            "burst sends": self.burst,
            f"busy polling ({self.busy_poll_us} µs)": self.busy_poll_us > 0,
            "loop execution": self.loop_execution,
            "direct routes": self.direct_routes,
        }
        on = [name for name, active in paths.items() if active]
        off = [name.split(" (")[0] for name, active in paths.items() if not active]
        return f"speed paths on: {', '.join(on) or 'none'}; off: {', '.join(off) or 'none'}"


@dataclass(frozen=True, slots=True)
class ProcessSettings:
    """What every process of a cell reads from its environment: ``DESPINA_SHM_DIR``
    (where arenas live, /dev/shm by default) and ``DESPINA_MAX_MESSAGE_BYTES`` (the
    largest message a link accepts, 2 GiB by default)."""

    shm_dir: str = SHM_DIR
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # Whether the process counts statistics (common/stats.py): ``DESPINA_STATISTICS``,
    # which serve sets on under --allow-metrics=true (off by default: no variable is
    # added to the processes' environment, which Python models see).
    statistics: bool = True

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> ProcessSettings:
        """Raises ValueError for a malformed ``DESPINA_MAX_MESSAGE_BYTES``."""
        raw = environ.get(MAX_MESSAGE_BYTES_ENV) or ""
        try:
            size = int(raw) if raw else MAX_MESSAGE_BYTES
        except ValueError:
            raise ValueError(
                f"{MAX_MESSAGE_BYTES_ENV} must be a number of bytes, got '{raw}'"
            ) from None
        if size <= 0:
            raise ValueError(f"{MAX_MESSAGE_BYTES_ENV} must be above 0, got '{raw}'")
        statistics = parse_switch(environ.get(STATISTICS_ENV) or "off", STATISTICS_ENV)
        return cls(environ.get(SHM_DIR_ENV) or SHM_DIR, size, statistics)

    def apply(self) -> None:
        """Set the module values that every arena and link of this process reads; call
        once at start-up, before the first arena or link (forked children, such as the
        Python backend's instance processes, inherit them)."""
        from despina.common import streams
        from despina.common.shm import arena

        arena.SHM_DIR = self.shm_dir
        streams.MAX_MESSAGE_BYTES = streams.MAX_FRAME_BYTES = self.max_message_bytes


@dataclass(frozen=True, slots=True)
class FrontendSettings:
    """A frontend's: its speed paths, and which transport serves each protocol
    (``DESPINA_HTTP_TRANSPORT``: lean or aiohttp; ``DESPINA_GRPC_TRANSPORT``: auto, the
    lean HTTP/2 transport where it can serve, or grpcio)."""

    speed: SpeedPaths = field(default_factory=SpeedPaths)
    process: ProcessSettings = field(default_factory=ProcessSettings)
    http_transport: str = "lean"
    grpc_transport: str = "auto"

    @classmethod
    def from_args(cls, args: object, environ: Mapping[str, str] = os.environ) -> FrontendSettings:
        """Raises ValueError naming the setting that is wrong."""
        http = environ.get(HTTP_TRANSPORT_ENV) or "lean"
        if http not in ("lean", "aiohttp"):
            raise ValueError(f"{HTTP_TRANSPORT_ENV} must be 'lean' or 'aiohttp', got {http!r}")
        # Only "grpcio" means something: any other value is "auto", as it always was.
        grpc = "grpcio" if environ.get(GRPC_TRANSPORT_ENV) == "grpcio" else "auto"
        return cls(
            SpeedPaths.from_args(args, environ), ProcessSettings.from_environ(environ), http, grpc
        )


@dataclass(frozen=True, slots=True)
class HostSettings:
    """A backend host's: its speed paths (busy polling, burst sends, loop execution)."""

    speed: SpeedPaths = field(default_factory=SpeedPaths)
    process: ProcessSettings = field(default_factory=ProcessSettings)

    @classmethod
    def from_args(cls, args: object, environ: Mapping[str, str] = os.environ) -> HostSettings:
        """Raises ValueError naming the setting that is wrong."""
        return cls(SpeedPaths.from_args(args, environ), ProcessSettings.from_environ(environ))


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """The scheduler's: its speed paths (burst sends, direct routes)."""

    speed: SpeedPaths = field(default_factory=SpeedPaths)
    process: ProcessSettings = field(default_factory=ProcessSettings)

    @classmethod
    def from_args(cls, args: object, environ: Mapping[str, str] = os.environ) -> SchedulerSettings:
        """Raises ValueError naming the setting that is wrong."""
        return cls(SpeedPaths.from_args(args, environ), ProcessSettings.from_environ(environ))
