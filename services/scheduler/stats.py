"""The statistics' totals: every frontend's and backend host's ``StatsReport`` added up
per model version, and the answer to a ``statistics`` query (the statistics extension,
and each frontend's /metrics scrape) as a ``control.Statistics`` record.

Totals live here, not in the reporters, so they survive a reporter's restart and add
up across every frontend and host. A delta naming a version "" (a request that named
none and failed before a version was picked) counts for the model's default version; a
delta for a model the repository does not have is dropped (Triton keeps no statistics
for unknown models). Off the request path: at most one report per reporter per
common/stats.FLUSH_S. Loop's thread only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from despina.common import control as c
from despina.common import messages as m
from despina.common import model_config, stats
from despina.common.errors import Code, ServerError, not_found
from despina.services.scheduler import validate
from despina.services.scheduler.interface import ModelScheduler
from despina.services.scheduler.repository import Model, State

log = logging.getLogger("despina.scheduler")


# How long a statistics query waits for the reporters' answers to its StatsFlush: one
# that is busy (an execute holding its loop) or gone is not waited for longer, and the
# query is answered with what arrived (its counts then at most common/stats.FLUSH_S old).
FLUSH_WAIT_S = 0.25


class _Round:
    """Statistics queries (``asked``: (asker, query)) waiting for the reporters' answers
    to one ``StatsFlush``."""

    __slots__ = ("asked", "waiting", "timer")

    def __init__(self, asked: list[tuple[object, m.Query]], waiting: set) -> None:
        self.asked = asked
        self.waiting = waiting
        self.timer: asyncio.TimerHandle | None = None


class StatsTotals:
    """Owns the totals, and the statistics queries waiting for fresh counts. ``models``
    and ``schedulers`` are read (the repository, and the per-version schedulers whose
    queues make the pending gauge).

    A statistics query is answered once every frontend and backend host has sent what it
    counted (``StatsFlush``, answered by a ``StatsReport`` with its token, after every row
    the reporter took before it), or after ``FLUSH_WAIT_S``: so a query counts every
    request answered before it was sent, as Triton's do, not only those reported by the
    reporters' own timers.

    One round at a time: the queries that come while a round is out wait for it to end
    and then share the next one (a round that began before them would miss what was
    answered meanwhile). However many queries or scrapes clients send, each reporter
    gets at most one ``StatsFlush`` per round, not one per query."""

    def __init__(
        self,
        models: Callable[[], dict[str, Model]],
        schedulers: dict[tuple[str, str], ModelScheduler],
        counting: bool = True,
        reply: Callable[[object, m.QueryReply], None] | None = None,
        flush: Callable[[m.StatsFlush], set] | None = None,
    ) -> None:
        """``counting``: whether the processes count (--allow-metrics); when they do not,
        a statistics query is refused rather than answered with zeros. ``reply(asker,
        reply)`` answers a query; ``flush(msg)`` sends ``msg`` to every reporter and
        returns their keys (what ``report`` is given as ``peer``); None: answer at once."""
        self._models = models
        self._schedulers = schedulers
        self.counting = counting
        self.totals: dict[tuple[str, str], c.ModelStatistics] = {}
        self._reply = reply
        self._flush = flush
        # The requests waiting in each process as its last answer to a flush said (a
        # backend host's batchers), by (model, version); only live processes are kept.
        self._waiting: dict[object, dict[tuple[str, str], int]] = {}
        self._round: tuple[int, _Round] | None = None  # the round out, by its token
        self._next: list[tuple[object, m.Query]] = []  # queries for the round after it
        self._tokens = itertools.count(1)

    def ask(self, asker: object, q: m.Query) -> None:
        """A statistics query from ``asker``: every reporter flushes, then it is answered
        (``reply``), or at once when nothing counts or no reporter is there."""
        if self._round is not None:
            self._next.append((asker, q))
            return
        self._start([(asker, q)])

    def _start(self, asked: list[tuple[object, m.Query]]) -> None:
        peers = set()
        token = 0
        if self.counting and self._flush is not None:
            token = next(self._tokens)
            peers = self._flush(m.StatsFlush(token))
            self._waiting = {p: w for p, w in self._waiting.items() if p in peers}
        if not peers:
            self._answer(asked)
            return
        entry = _Round(asked, peers)
        self._round = (token, entry)
        entry.timer = asyncio.get_running_loop().call_later(FLUSH_WAIT_S, self._done, token)

    def _done(self, token: int) -> None:
        if self._round is None or self._round[0] != token:
            return
        entry = self._round[1]
        self._round = None
        if entry.timer is not None:
            entry.timer.cancel()
        if entry.waiting:
            log.debug("statistics answered without %d reporter(s)", len(entry.waiting))
        self._answer(entry.asked)
        if self._next:
            asked, self._next = self._next, []
            self._start(asked)

    def _answer(self, asked: list[tuple[object, m.Query]]) -> None:
        assert self._reply is not None
        for asker, q in asked:
            self._reply(asker, self.answer(q))

    def report(self, msg: m.StatsReport, peer: object = None) -> None:
        """Add one reporter's deltas in (``peer``: the reporter, whose ``flushed`` answer
        a waiting query may be waiting for)."""
        self._merge(msg)
        if msg.flushed:  # its answer to a flush: what waits in it now
            self._waiting[peer] = {(d.name, d.version): d.pending for d in msg.models if d.pending}
        out = self._round
        if msg.flushed and out is not None and out[0] == msg.flushed:
            out[1].waiting.discard(peer)
            if not out[1].waiting:
                self._done(msg.flushed)

    def _merge(self, msg: m.StatsReport) -> None:
        models = self._models()
        totals = self.totals
        for delta in msg.models:
            version = delta.version
            if not version:
                model = models.get(delta.name)
                version = (model.default_version() if model is not None else None) or ""
                if not version:
                    continue
            elif delta.name not in models:
                continue
            key = (delta.name, version)
            total = totals.get(key)
            if total is None:
                total = totals[key] = c.ModelStatistics(delta.name, version)
            stats.merge(total, delta)
            if total.first_response_ns:  # binned here, on the model's own buckets
                stats.bin_first_responses(total, _first_bounds(models.get(delta.name)))

    def answer(self, q: m.Query) -> m.QueryReply:
        """The totals ``q`` asks for (never raises): ``q.model`` "" for every ready model
        version; a model (and version, "" for all of its ready ones) that is not there is
        the error a metadata query would get."""
        try:
            if not self.counting:
                raise ServerError(
                    Code.UNSUPPORTED,
                    "statistics are not counted on this server: start it with "
                    "--allow-metrics=true (docs/observability.md)",
                )
            record = self._statistics(q.model, q.version)
        except ServerError as exc:
            return m.QueryReply(q.qid, b"", m.Error(exc.code.value, exc.message))
        return m.QueryReply(q.qid, record=record)

    def _statistics(self, name: str, version: str) -> c.Statistics:
        models = self._models()
        if not name:
            keys = [
                (model.name, v)
                for model in sorted(models.values(), key=lambda model: model.name)
                for v in sorted(model.ready_versions(), key=_version_order)
            ]
        else:
            model = models.get(name)
            if model is None:
                raise not_found(f"Request for unknown model: '{name}' is not found")
            if version:
                keys = [(name, validate.resolve_version(model, version))]
            else:
                validate.resolve_version(model, "")  # Triton's error for no ready version
                keys = [
                    (name, v)
                    for v, mv in sorted(model.versions.items(), key=lambda e: _version_order(e[0]))
                    if mv.state is State.READY
                ]
        return c.Statistics([self._snapshot(key, models) for key in keys])

    def _snapshot(self, key: tuple[str, str], models: dict[str, Model]) -> c.ModelStatistics:
        total = self.totals.get(key)
        record = c.ModelStatistics(key[0], key[1])
        if total is not None:
            stats.merge(record, total)  # a copy: the reply is encoded after more reports
        model = models.get(key[0])
        config = model.config if model is not None else None
        if config is not None and config.model_transaction_policy.decoupled:
            # A decoupled model has a time-to-first-response histogram from its load
            # (all zeros until it answers), as in Triton's /metrics, on its buckets.
            stats.bin_first_responses(record, _first_bounds(model))
        scheduler = self._schedulers.get(key)
        if scheduler is not None:
            queue = getattr(scheduler, "queue", ())
            batcher = getattr(scheduler, "batcher", ())
            record.pending = len(queue) + len(batcher)
        record.pending += sum(waiting.get(key, 0) for waiting in self._waiting.values())
        return record


def _first_bounds(model: Model | None) -> list[float]:
    """The bounds (ms) of ``model``'s first-response histogram (its config checked them
    at load: model_config.validate)."""
    if model is not None and model.config is not None:
        try:
            return model_config.first_response_bounds(model.config)
        except ValueError:
            pass
    return list(stats.FIRST_RESPONSE_BOUNDS_MS)


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (0, version)
