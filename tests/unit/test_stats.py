"""common/stats.py (deltas, merging, histograms), the scheduler's totals
(services/scheduler/stats.py) and the metrics exposition (services/frontend/metrics.py)
on real records: what each process counts adds up exactly, and the text is Triton's."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from despina.common import control as c
from despina.common import messages as m
from despina.common import stats
from despina.services.frontend import control as encode
from despina.services.frontend.metrics import (
    MachineGauges,
    MetricsConfig,
    StatsCollector,
    exposition,
)


def test_observe_puts_each_duration_in_its_bucket():
    s = c.ModelStatistics("m", "1")
    stats.observe(s, "queue", 50_000)  # 50 µs: le 50
    stats.observe(s, "queue", 50_001)  # just above: le 100
    stats.observe(s, "queue", 10**12, 3)  # beyond the last bound: +Inf, three times
    buckets = s.stages["queue"]
    assert len(buckets) == len(stats.BOUNDS_US) + 2
    assert buckets[0] == 1 and buckets[1] == 1 and buckets[-2] == 3
    assert buckets[-1] == 50_000 + 50_001 + 3 * 10**12


def test_recorder_sends_one_report_per_period_then_nothing():
    sent: list[m.StatsReport] = []

    async def run() -> None:
        recorder = stats.Recorder(sent.append, period_s=0.02)
        recorder.request("m", "1", 1000, None)
        recorder.request("m", "1", 3000, None)
        recorder.request("m", "1", 500, stats.BACKEND)
        recorder.execution("m", "1", 4, 6, 400, 10, 100, 20, 1234, batch_wait_ns=4000)
        await asyncio.sleep(0.06)
        assert len(sent) == 1  # one report for all of it
        await asyncio.sleep(0.06)
        assert len(sent) == 1  # idle: nothing more

    asyncio.run(run())
    (delta,) = sent[0].models
    assert sent[0].flushed == 0  # its own timing, not an answer to a flush
    assert (delta.success_count, delta.success_ns) == (2, 4000)
    assert delta.fail == {stats.BACKEND: [1, 500]}
    # Triton's queue time is both waits: the host's queue and its batcher's.
    assert (delta.queue_count, delta.queue_ns) == (4, 4400)
    assert sum(delta.stages["batch_wait"][:-1]) == 4 and delta.stages["batch_wait"][-1] == 4000
    assert (delta.infer_count, delta.infer_ns) == (4, 400)  # the batch's time, per request
    assert (delta.inference_count, delta.execution_count, delta.last_inference) == (6, 1, 1234)
    assert delta.batch == {6: [1, 10, 100, 20]}
    assert sum(delta.stages["compute"][:-1]) == 4
    assert sum(delta.stages["request"][:-1]) == 2


def test_merge_adds_deltas_of_every_reporter_exactly():
    total = c.ModelStatistics("m", "1")
    for i in range(3):
        delta = c.ModelStatistics("m", "1")
        delta.success_count, delta.success_ns = 2, 10
        delta.fail = {stats.REJECTED: [1, 5]}
        delta.batch = {2: [1, 1, 2, 3]}
        delta.last_inference = 100 + i
        stats.observe(delta, "compute", 700_000)
        # Over the wire, as a StatsReport.
        wire = msgspec.msgpack.decode(
            msgspec.msgpack.encode(m.StatsReport([delta])), type=m.StatsReport
        )
        stats.merge(total, wire.models[0])
    assert (total.success_count, total.success_ns) == (6, 30)
    assert total.fail == {stats.REJECTED: [3, 15]}
    assert total.batch == {2: [3, 3, 6, 9]}
    assert total.last_inference == 102
    assert sum(total.stages["compute"][:-1]) == 3


def test_quantile_interpolates_within_the_bucket():
    s = c.ModelStatistics("m", "1")
    stats.observe(s, "request", 75_000, 10)  # ten in (50, 100] µs
    assert stats.quantile(s.stages["request"], 0.5) == pytest.approx(75.0)
    assert stats.quantile([0] * (len(stats.BOUNDS_US) + 2), 0.5) == 0.0


def test_metrics_config_parses_tritons_settings():
    config = MetricsConfig.parse(
        ["summary_latencies=true", "summary_quantiles=0.5:0.05,0.99:0.001"]
    )
    assert config.summary_latencies and config.summary_quantiles == (0.5, 0.99)
    assert MetricsConfig.parse(None) == MetricsConfig()
    with pytest.raises(ValueError, match="unknown --metrics-config setting 'nope'"):
        MetricsConfig.parse(["nope=1"])
    with pytest.raises(ValueError, match="summary_latencies takes true or false"):
        MetricsConfig.parse(["summary_latencies=maybe"])
    with pytest.raises(ValueError, match="within"):
        MetricsConfig.parse(["summary_quantiles=1.5:0.1"])


def snapshot() -> c.Statistics:
    s = c.ModelStatistics("simple", "1", success_count=3, success_ns=3_000_000)
    s.fail = {stats.BACKEND: [2, 10]}
    s.inference_count, s.execution_count = 3, 2
    for _ in range(3):
        stats.observe(s, "request", 1_000_000)
    return c.Statistics([s])


def test_exposition_has_tritons_names_and_summaries():
    collector = StatsCollector(
        MetricsConfig(summary_latencies=True, summary_quantiles=(0.5,)),
        MachineGauges(60.0, cpu=True, gpu=False),
    )
    collector.snapshot = snapshot()
    text = exposition(collector).decode()
    assert "# TYPE nv_inference_request_success counter\n" in text
    assert 'nv_inference_request_success{model="simple",version="1"} 3.0\n' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    failures = {
        s.labels["reason"]: s.value for s in families["nv_inference_request_failure"].samples
    }
    assert failures == {"REJECTED": 0, "CANCELED": 0, "BACKEND": 2, "OTHER": 0}
    summary = families["nv_inference_request_summary_us"]
    assert summary.type == "summary"
    by_name = {(s.name, s.labels.get("quantile")): s.value for s in summary.samples}
    assert by_name[("nv_inference_request_summary_us_count", None)] == 3
    assert by_name[("nv_inference_request_summary_us_sum", None)] == 3000.0
    assert 500 < by_name[("nv_inference_request_summary_us", "0.5")] <= 1000
    assert families["nv_inference_request_duration_us"].samples[0].value == 3000.0


def test_statistics_encoders_match_tritons_shapes():
    record = snapshot()
    record.models[0].batch = {1: [1, 5, 6, 7], 2: [1, 8, 9, 10]}
    doc = msgspec.json.decode(encode.statistics_json(record))
    (entry,) = doc["model_stats"]
    assert entry["inference_stats"]["fail"] == {"count": 2, "ns": 10}
    assert [b["batch_size"] for b in entry["batch_stats"]] == [1, 2]
    assert entry["batch_stats"][1]["compute_infer"] == {"count": 1, "ns": 9}
    proto = encode.statistics_pb(record)
    (pb_entry,) = proto.model_stats
    assert pb_entry.inference_stats.success.count == 3
    assert pb_entry.batch_stats[0].compute_output.ns == 7


def test_first_response_histogram_counts_each_requests_first_response():
    """A decoupled request's first response (index 0: a response, an error or the empty
    final, not a cancel) lands in Triton's buckets; later ones do not; deltas add up;
    the exposition (histogram_latencies) is Triton's histogram in ms, only for the
    model versions that have one."""
    sent: list = []

    async def run() -> None:
        recorder = stats.Recorder(sent.append, period_s=60)
        recorder.response("d", "1", 0, stats.RESPONSE_SUCCESS, 50_000_000)  # 50 ms: le 100
        recorder.response("d", "1", 1, stats.RESPONSE_SUCCESS, 900_000_000)  # not a first
        recorder.response("d", "1", 0, stats.RESPONSE_EMPTY, 600_000_000)  # le 2000
        recorder.response("d", "1", 0, stats.RESPONSE_FAIL, 9_000_000_000)  # +Inf
        recorder.response("d", "1", 0, stats.RESPONSE_CANCEL, 1_000_000)  # never answered
        recorder.flush()

    asyncio.run(run())
    (delta,) = sent[0].models  # the times as counted: the scheduler bins them
    assert delta.first_response_ns == [50_000_000, 600_000_000, 9_000_000_000]
    assert delta.first_response == []
    total = c.ModelStatistics("d", "1")
    for _ in range(2):
        stats.merge(total, delta)
        stats.bin_first_responses(total, list(stats.FIRST_RESPONSE_BOUNDS_MS))
    assert total.first_response == [2, 0, 2, 0, 2, 19_300_000_000]
    assert total.first_response_ns == [] and total.first_response_le == [100, 500, 2000, 5000]

    collector = StatsCollector(
        MetricsConfig(histogram_latencies=True), MachineGauges(60.0, cpu=False, gpu=False)
    )
    plain = c.ModelStatistics("simple", "1", success_count=1)
    collector.snapshot = c.Statistics([total, plain])
    text = exposition(collector).decode()
    assert "# TYPE nv_inference_first_response_histogram_ms histogram\n" in text
    assert (
        'nv_inference_first_response_histogram_ms_bucket{le="100",model="d",version="1"} 2.0'
        in text
    )
    (family,) = [
        f
        for f in text_string_to_metric_families(text)
        if f.name == "nv_inference_first_response_histogram_ms"
    ]
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert {s.labels["model"] for s in family.samples} == {"d"}  # not the plain model
    assert [samples[("nv_inference_first_response_histogram_ms_bucket", le)] for le in
            ("100", "500", "2000", "5000", "+Inf")] == [2, 2, 4, 4, 6]  # fmt: skip
    assert samples[("nv_inference_first_response_histogram_ms_count", None)] == 6
    assert samples[("nv_inference_first_response_histogram_ms_sum", None)] == 19_300.0
    collector.config = MetricsConfig()  # off by default, as in Triton
    assert b"first_response" not in exposition(collector)


def _flushing(monkeypatch) -> tuple:
    """The scheduler's statistics module with FLUSH_WAIT_S at 0.05 s, a ``flush`` that
    keeps each token sent (to a frontend and a host), the replies' and tokens' lists."""
    from despina.services.scheduler import stats as totals

    monkeypatch.setattr(totals, "FLUSH_WAIT_S", 0.05)
    replies: list = []
    flushes: list = []

    def flush(msg: m.StatsFlush) -> set:
        flushes.append(msg.token)
        return {"frontend", "host"}

    return totals, flush, replies, flushes


def test_a_statistics_query_waits_for_every_reporters_flush(monkeypatch):
    """The scheduler answers a statistics query once every reporter answered its
    StatsFlush (their counts merged first), or after FLUSH_WAIT_S without the silent
    ones; with nothing counted it answers at once."""
    totals, flush, replies, flushes = _flushing(monkeypatch)

    async def run() -> None:
        store = totals.StatsTotals(
            dict, {}, reply=lambda asker, r: replies.append((asker, r)), flush=flush
        )
        q = m.Query(7, "statistics")
        store.ask("asker", q)
        (token,) = flushes
        store.report(m.StatsReport([], token), "frontend")
        assert replies == []  # the host has not answered yet
        store.report(m.StatsReport([], 0), "host")  # its own timing: not the answer
        assert replies == []
        store.report(m.StatsReport([], token), "host")
        assert [(a, r.qid) for a, r in replies] == [("asker", 7)]
        store.report(m.StatsReport([], token), "host")  # late, twice: nothing more
        assert len(replies) == 1
        store.ask("asker", m.Query(8, "statistics"))  # a reporter stays silent
        store.report(m.StatsReport([], flushes[-1]), "frontend")
        await asyncio.sleep(0.1)
        assert [r.qid for _, r in replies] == [7, 8]
        off = totals.StatsTotals(
            dict, {}, counting=False, reply=lambda a, r: replies.append((a, r)), flush=flush
        )
        off.ask("asker", m.Query(9, "statistics"))
        assert replies[-1][1].error is not None and len(flushes) == 2  # refused, no flush

    asyncio.run(run())


def test_queries_while_a_round_is_out_share_the_next_one(monkeypatch):
    """A flood of statistics queries costs each reporter one StatsFlush per round, not
    one per query: those asked while a round is out wait for it, then share the next
    (which counts what was answered meanwhile); every query is answered, in order."""
    totals, flush, replies, flushes = _flushing(monkeypatch)

    def answered() -> list[int]:
        return [r.qid for _, r in replies]

    async def run() -> None:
        store = totals.StatsTotals(
            dict, {}, reply=lambda asker, r: replies.append((asker, r)), flush=flush
        )
        store.ask("a", m.Query(1, "statistics"))
        for qid in range(2, 102):  # 100 more while the first round is out
            store.ask("b", m.Query(qid, "statistics"))
        assert len(flushes) == 1 and answered() == []
        first = flushes[0]
        store.report(m.StatsReport([], first), "frontend")
        store.report(m.StatsReport([], first), "host")
        assert answered() == [1]  # the first round was its own
        assert len(flushes) == 2  # one round for the 100
        second = flushes[1]
        store.ask("c", m.Query(200, "statistics"))  # after the second round went out
        store.report(m.StatsReport([], first), "host")  # a late answer to the first: nothing
        store.report(m.StatsReport([], second), "frontend")
        store.report(m.StatsReport([], second), "host")
        assert answered() == list(range(1, 102)) and len(flushes) == 3
        await asyncio.sleep(0.1)  # nobody answers the third: answered at FLUSH_WAIT_S
        assert answered() == [*range(1, 102), 200] and len(flushes) == 3

    asyncio.run(run())


def test_a_decoupled_model_has_a_first_response_histogram_from_its_load():
    """Before any request, a ready decoupled model version's statistics carry an empty
    time-to-first-response histogram (listed in /metrics, as in Triton's); a model that
    is not decoupled carries none."""
    from pathlib import Path

    from despina.common.protos import model_config_pb2 as mc
    from despina.services.scheduler import stats as totals
    from despina.services.scheduler.repository import Model, ModelVersion, State

    def model(name: str, decoupled: bool) -> Model:
        config = mc.ModelConfig(name=name, backend="python")
        config.model_transaction_policy.decoupled = decoupled
        return Model(name, Path(name), config, versions={"1": ModelVersion(name, "1", State.READY)})

    models = {"streams": model("streams", True), "plain": model("plain", False)}
    store = totals.StatsTotals(lambda: models, {})
    reply = store.answer(m.Query(1, "statistics"))
    assert reply.error is None
    got = {s.name: s.first_response for s in c.expect(reply.record, c.Statistics).models}
    assert got == {"plain": [], "streams": [0] * 6}  # Triton's 4 buckets, +Inf, the sum


def test_a_models_own_first_response_buckets():
    """A config's model_metrics sets the first-response buckets (Triton's family;
    another's options are not used); the scheduler bins the frontends' times on them and
    /metrics labels them; buckets no histogram can take are refused at load, saying
    what to fix."""
    from pathlib import Path

    from despina.common import model_config
    from despina.common.errors import ServerError
    from despina.services.scheduler import stats as totals
    from despina.services.scheduler.repository import Model, ModelVersion, State

    base = 'name: "d" backend: "python" model_transaction_policy { decoupled: true }\n'

    def config(options: str):
        return model_config.parse_text(base + options)

    own = config(
        "model_metrics { metric_control [ { metric_identifier { family: "
        '"nv_inference_first_response_histogram_ms" } histogram_options { buckets: [ 0.5, 20 ] } } ] }'
    )
    model_config.validate(own)
    assert model_config.first_response_bounds(own) == [0.5, 20.0]
    assert model_config.first_response_bounds(config("")) == [100, 500, 2000, 5000]
    other = config(
        "model_metrics { metric_control [ { metric_identifier { family: "
        '"nv_inference_request_duration_us" } histogram_options { buckets: [ 1 ] } } ] }'
    )
    model_config.validate(other)  # loads, those options unused (warn_unused says so)
    assert model_config.first_response_bounds(other) == [100, 500, 2000, 5000]
    for options, says in (
        ('metric_identifier { family: "nv_inference_first_response_histogram_ms" } '
         "histogram_options { buckets: [ 5, 1 ] }", "increasing order"),
        ('metric_identifier { family: "nv_inference_first_response_histogram_ms" }',
         "increasing order"),
        ('metric_identifier { family: "nv_inference_first_response_histogram_ms" } '
         f"histogram_options {{ buckets: {list(range(1, 66))} }}", "at most 64 buckets, got 65"),
    ):  # fmt: skip
        with pytest.raises(ServerError) as err:
            model_config.validate(config(f"model_metrics {{ metric_control [ {{ {options} }} ] }}"))
        assert says in err.value.message and "model 'd'" in err.value.message

    models = {"d": Model("d", Path("d"), own, versions={"1": ModelVersion("d", "1", State.READY)})}
    store = totals.StatsTotals(lambda: models, {})
    delta = c.ModelStatistics("d", "1", first_response_ns=[100_000, 500_000, 3_000_000, 10**9])
    store.report(m.StatsReport([delta]))
    store.report(m.StatsReport([c.ModelStatistics("d", "1", first_response_ns=[21_000_000])]))
    (total,) = c.expect(store.answer(m.Query(1, "statistics")).record, c.Statistics).models
    assert total.first_response_le == [0.5, 20.0]
    assert total.first_response == [2, 1, 2, 100_000 + 500_000 + 3_000_000 + 10**9 + 21_000_000]
    collector = StatsCollector(
        MetricsConfig(histogram_latencies=True), MachineGauges(60.0, cpu=False, gpu=False)
    )
    collector.snapshot = c.Statistics([total])
    text = exposition(collector).decode()
    for le, count in (("0.5", 2), ("20", 3), ("+Inf", 5)):
        assert (
            f'nv_inference_first_response_histogram_ms_bucket{{le="{le}",model="d",version="1"}} '
            f"{count}.0" in text
        )


def test_pending_adds_up_what_waits_in_every_host(monkeypatch):
    """A host's answer to a flush says what waits in it (``gauges``; a report of its own
    timing does not); the scheduler's pending is its own queue plus each live
    process's last answer, and a process gone from the next round is dropped."""
    totals, _, replies, flushes = _flushing(monkeypatch)
    peers = {"host-a", "host-b"}

    def flush(msg: m.StatsFlush) -> set:
        flushes.append(msg.token)
        return set(peers)

    waiting = {("d", "1"): 3, ("e", "1"): 0}
    sent: list = []

    async def run() -> None:
        recorder = stats.Recorder(sent.append, period_s=60, gauges=lambda: waiting)
        recorder.flush()  # its own timing: no gauges, nothing to send
        recorder.flush(9)
        assert [(d.name, d.pending) for d in sent[-1].models] == [("d", 3)]

        store = totals.StatsTotals(dict, {}, reply=lambda a, r: replies.append(r), flush=flush)

        def pending() -> int:
            return store._snapshot(("d", "1"), {}).pending

        store.ask("asker", m.Query(1, "statistics"))
        token = flushes[-1]
        store.report(m.StatsReport([c.ModelStatistics("d", "1", pending=3)], token), "host-a")
        store.report(m.StatsReport([c.ModelStatistics("d", "1", pending=2)], token), "host-b")
        assert pending() == 5 and len(replies) == 1
        store.report(m.StatsReport([c.ModelStatistics("d", "1", pending=7)], 0), "host-a")
        assert pending() == 5  # not an answer to a flush: no gauge in it
        peers.discard("host-b")  # gone before the next round
        store.ask("asker", m.Query(2, "statistics"))
        token = flushes[-1]
        store.report(m.StatsReport([], token), "host-a")  # nothing waits in it now
        assert pending() == 0 and len(replies) == 2

    asyncio.run(run())


def test_a_recorder_answers_a_flush_even_with_nothing_counted():
    sent: list = []

    async def run() -> None:
        recorder = stats.Recorder(sent.append, period_s=60)
        recorder.flush()
        assert sent == []  # its own flush with nothing: nothing sent
        recorder.flush(5)
        recorder.request("m", "1", 10, None)
        recorder.flush(6)

    asyncio.run(run())
    assert [(r.flushed, len(r.models)) for r in sent] == [(5, 0), (6, 1)]
