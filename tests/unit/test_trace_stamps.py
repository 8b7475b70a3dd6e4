"""common/trace_stamps.py: which settings turn stamping on, and the stamps the scheduler
and the backend host add to traced requests only, in order on the wall clock."""

from __future__ import annotations

import time

from despina.common import messages as m
from despina.common import trace_stamps


def _infer(rid: int, trace: list | None) -> m.Infer:
    return m.Infer(rid, "simple", "1", [], [], {}, trace=trace)


def test_tracing_is_on_while_any_level_is():
    assert not trace_stamps.tracing({})
    assert not trace_stamps.tracing({"": {"trace_level": ["OFF"]}, "a": {"trace_rate": ["2"]}})
    assert trace_stamps.tracing({"": {"trace_level": ["OFF"]}, "a": {"trace_level": ["TENSORS"]}})
    assert trace_stamps.tracing({"": {"trace_level": ["TIMESTAMPS"]}})


def test_only_traced_requests_are_stamped_and_never_backwards():
    later = time.time_ns() + 10**9
    traced, fresh, untraced = _infer(1, [("QUEUE_START", later)]), _infer(2, []), _infer(3, None)
    trace_stamps.stamp([traced, fresh, untraced], "COMPUTE_START")
    assert untraced.trace is None
    assert fresh.trace is not None and [n for n, _ in fresh.trace] == ["COMPUTE_START"]
    assert fresh.trace[0][1] < later
    # a stamp below the one before it (another process's clock read later) is raised to it
    assert traced.trace == [("QUEUE_START", later), ("COMPUTE_START", later)]


def test_computed_moves_the_monotonic_run_onto_the_wall_clock():
    req = _infer(1, [])
    before = time.time_ns()
    start = time.monotonic()
    end = start + 0.002
    trace_stamps.computed([req], (start, end))
    assert req.trace is not None
    names = [n for n, _ in req.trace]
    assert names == ["COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END"]
    input_end, output_start, _ = (ns for _, ns in req.trace)
    assert before - 10**6 <= input_end <= before + 10**6  # the same instant, within 1 ms
    assert abs((output_start - input_end) - 2_000_000) < 10_000
    # a run that did not happen (failed as a whole) leaves only COMPUTE_END
    failed = _infer(2, [])
    trace_stamps.computed([failed], None)
    assert failed.trace is not None and [n for n, _ in failed.trace] == ["COMPUTE_END"]


def test_the_wire_carries_the_stamps_and_untraced_requests_stay_small():
    encode = m.encoder().encode
    decode = m.decoder(m.InferBatch).decode
    plain = encode(m.InferBatch("ipc://x", [_infer(1, None)]))
    traced = encode(m.InferBatch("ipc://x", [_infer(1, [("REQUEST_START", 5)])]))
    assert decode(traced).requests[0].trace == [("REQUEST_START", 5)]
    assert decode(plain).requests[0].trace is None
    # the absent list is one msgpack nil, before the request's last field (stream: false)
    assert encode(_infer(1, None)).endswith(b"\xc0\xc2")
    reply = m.InferReply(1, "simple", "1", [], None, [("QUEUE_START", 7)])
    assert m.decoder(m.ReplyBatch).decode(encode(m.ReplyBatch([reply]))).replies[0].trace == [
        ("QUEUE_START", 7)
    ]
