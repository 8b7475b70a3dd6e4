"""Trace timestamps taken outside the frontend: the scheduler's and the backend host's
part of a traced request's trace (services/frontend/trace.py writes the whole).

A traced request carries ``Infer.trace``, a list of (Triton activity name, wall-clock ns)
that each process appends to and the reply brings back; an untraced one carries None and
costs nothing here: each process calls these functions only while some trace level is on
(``tracing``, from the scheduler's ``Settings``), once per batch, not per request.

Every process stamps ``time.time_ns()`` (one clock for all processes on a machine, so
stamps from several processes compare); times a process measured on the monotonic clock
(an execution's ``ran``) are moved onto it with one offset taken at the stamp, and a
stamp never goes below the one before it in the same list. Loop's thread only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from despina.common import messages as m


def tracing(trace: dict[str, dict[str, list[str]]]) -> bool:
    """Whether any trace level is on in the settings (``Settings.trace``)."""
    return any(
        level != "OFF" for fields in trace.values() for level in fields.get("trace_level", [])
    )


def stamp(requests: Iterable[m.Infer], name: str, ns: int = 0) -> None:
    """Append ``name`` at ``ns`` (0: now) to each traced request of ``requests``."""
    ns = ns or time.time_ns()
    for req in requests:
        trace = req.trace
        if trace is not None:
            trace.append((name, max(ns, trace[-1][1]) if trace else ns))


def computed(requests: Iterable[m.Infer], ran: tuple[float, float] | None) -> None:
    """The execution of ``requests`` ended: COMPUTE_INPUT_END and COMPUTE_OUTPUT_START at
    the model's execute start and end (``ran``, time.monotonic; None: it did not run),
    then COMPUTE_END now."""
    now = time.time_ns()
    requests = list(requests)
    if ran is not None:
        offset = now - time.monotonic_ns()
        stamp(requests, "COMPUTE_INPUT_END", int(ran[0] * 1e9) + offset)
        stamp(requests, "COMPUTE_OUTPUT_START", int(ran[1] * 1e9) + offset)
    stamp(requests, "COMPUTE_END", now)
