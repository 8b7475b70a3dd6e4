"""common/stats.py's column counting (``Recorder.success``, ``request`` and ``executions``,
added up with numpy at the flush) against the one-at-a-time arithmetic it replaced
(``observe`` per request, ``Recorder.execution`` per execution): every field of every
delta equal, on seeded random traffic of several model versions, failure reasons, batch
sizes and stage durations on both sides of the histograms' bounds."""

from __future__ import annotations

import asyncio
import random

from despina.common import stats
from despina.common.control import ModelStatistics

KEYS = [("a", "1"), ("a", "2"), ("b", "1")]


def by_row_request(into: dict, model, version, ns, reason, decode=-1, encode=-1) -> None:
    """One request, counted the old way (the reference)."""
    s = into.setdefault((model, version), ModelStatistics(model, version))
    if reason is None:
        s.success_count += 1
        s.success_ns += ns
        stats.observe(s, "request", ns)
        if decode >= 0:
            stats.observe(s, "frontend_decode", decode)
        if encode >= 0:
            stats.observe(s, "frontend_encode", encode)
    else:
        entry = s.fail.setdefault(reason, [0, 0])
        entry[0] += 1
        entry[1] += ns


def flushed(recorder: stats.Recorder, sent: list) -> dict:
    recorder.flush()
    return {(s.name, s.version): s for s in sent.pop().models}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, s in want.items():
        for field in s.__struct_fields__:
            assert getattr(got[key], field) == getattr(s, field), (key, field)


def test_requests_and_successes_by_columns_count_as_one_at_a_time():
    rng = random.Random(7)
    sent: list = []
    want: dict = {}

    async def run() -> dict:
        recorder = stats.Recorder(sent.append, period_s=60)
        for _ in range(3000):
            model, version = rng.choice(KEYS)
            t0 = rng.uniform(1000.0, 2000.0)
            sent_at = rng.choice([0.0, t0 + rng.uniform(0, 1e-3)])
            reply = rng.choice([0.0, t0 + rng.uniform(1e-3, 2.0)])
            now = max(t0, reply) + rng.uniform(0, 1e-2)
            kind = rng.random()
            if kind < 0.6:  # a success from a frontend's call times
                recorder.success(model, version, t0, sent_at, reply, now)
                by_row_request(
                    want,
                    model,
                    version,
                    int((now - t0) * 1e9),
                    None,
                    int((sent_at - t0) * 1e9) if sent_at else -1,
                    int((now - reply) * 1e9) if reply else -1,
                )
            else:  # a success or failure given as durations
                ns = rng.randrange(1, 10**10)
                reason = None if kind < 0.8 else rng.choice(stats.REASONS)
                decode, encode = rng.choice([-1, rng.randrange(0, 10**8)]), -1
                recorder.request(model, version, ns, reason, decode, encode)
                by_row_request(want, model, version, ns, reason, decode, encode)
        return flushed(recorder, sent)

    got = asyncio.run(run())
    assert_same(got, want)
    assert sum(s.success_count for s in got.values()) > 2000


def test_executions_by_columns_count_as_one_at_a_time():
    rng = random.Random(11)
    sent: list = []
    wall_ms, now = 1.7e12, 5000.0
    rows: dict[tuple[str, str], list] = {}  # per model version, as each instance queues them
    reference = stats.Recorder(lambda models: None, period_s=60)

    async def run() -> dict:
        recorder = stats.Recorder(sent.append, period_s=60)
        for _ in range(2000):
            model, version = rng.choice(KEYS)
            n = rng.randint(1, 8)
            inferences = n * rng.choice([1, 1, 2, 4])
            # The times as the executor reads them: inputs, launch (0.0: at the start,
            # or a launch a hair after the start: no queue time), execute, answer.
            input_at = rng.uniform(4000.0, 5000.0)
            launched_at = input_at + rng.uniform(0, 0.01)
            start = launched_at + rng.choice([0.0, rng.uniform(0, 0.5)])
            launched_at = rng.choice([launched_at, 0.0, start + 1e-7])
            end = start + rng.uniform(0, 0.01)
            answered = end + rng.uniform(0, 0.01)
            batched_s = rng.choice([-1.0, rng.uniform(0, 0.1)])
            row = (n, inferences, input_at, launched_at, start, end, answered, batched_s)
            rows.setdefault((model, version), []).extend(row)
            launch = launched_at or start
            reference.execution(
                model,
                version,
                n,
                inferences,
                int(n * max(0.0, start - launch) * 1e9),
                int((launch - input_at) * 1e9),
                int((end - start) * 1e9),
                int((answered - end) * 1e9),
                int(wall_ms - (now - end) * 1000),
                int(batched_s * 1e9) if batched_s >= 0 else -1,
            )
        for (model, version), queued in rows.items():
            recorder.executions(model, version, queued, wall_ms, now)
        return flushed(recorder, sent)

    got = asyncio.run(run())
    want = {key: s for key, s in reference._models.items()}
    assert_same(got, want)
    assert sum(s.execution_count for s in got.values()) == 2000
    assert all(len(s.batch) > 1 and "batch_wait" in s.stages for s in got.values())


def test_a_busy_period_is_counted_in_bounded_steps_and_sent_once():
    """At any rate, at most ``COUNT_AT`` rows wait to be counted (one count's hold on the
    loop stays short); what was counted early is sent with the rest, at the flush."""
    sent: list = []
    total = stats.COUNT_AT * 3 + 5

    async def run() -> dict:
        recorder = stats.Recorder(sent.append, period_s=60)
        longest = 0
        for i in range(total):
            recorder.success("a", "1", 10.0 + i, 10.0 + i + 1e-4, 10.0 + i + 5e-4, 10.0 + i + 1e-3)
            longest = max(longest, len(recorder.successes) // 6)
        assert longest <= stats.COUNT_AT
        assert not sent  # counted, not sent: one report per period
        return flushed(recorder, sent)

    got = asyncio.run(run())
    assert got[("a", "1")].success_count == total
    assert len(sent) == 0  # flushed() took the one report
