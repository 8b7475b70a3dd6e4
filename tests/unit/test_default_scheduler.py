"""The default scheduler and the dynamic batcher share out requests over instances:
the least busy first, and among equally busy ones in turn."""

from __future__ import annotations

from despina.common import messages as m
from despina.common.batching import BatchRules
from despina.services.scheduler.default import DefaultScheduler
from despina.services.scheduler.dynamic_batcher import DynamicBatcher
from despina.services.scheduler.interface import Pending, Slot


def _slots(sched: DefaultScheduler, hosts: list[str]) -> list[Slot]:
    slots = [Slot(host, "m", "1", i) for i, host in enumerate(hosts)]
    for slot in slots:
        sched.add_slot(slot)
    return slots


def _request() -> Pending:
    tensor = m.Tensor("INPUT0", "FP32", [1, 4], m.Inline(0))
    return Pending(frontend=b"f", request=m.Infer(1, "m", "1", [tensor], [], {}))


def _one_at_a_time(sched: DefaultScheduler, n: int) -> list[int]:
    """Send ``n`` requests one after the other, each completed before the next."""
    served = []
    for _ in range(n):
        sched.enqueue(_request())
        [(slot, batch)] = sched.next_batches()
        assert len(batch) == 1
        served.append(slot.index)
        sched.completed(slot, 1)
    return served


def test_one_request_at_a_time_takes_turns_over_the_instances():
    sched = DefaultScheduler()
    _slots(sched, ["host-a", "host-a", "host-b"])
    assert _one_at_a_time(sched, 7) == [0, 1, 2, 0, 1, 2, 0]


def test_least_busy_first_then_second_requests():
    sched = DefaultScheduler(depth=2)
    slots = _slots(sched, ["host-a", "host-b"])
    for _ in range(5):
        sched.enqueue(_request())
    batches = sched.next_batches()
    # Each instance gets one, then each a second; the fifth waits for a free instance.
    assert [slot.index for slot, _ in batches] == [0, 1, 0, 1]
    assert [s.busy for s in slots] == [2, 2]
    assert len(sched.queue) == 1
    sched.completed(slots[1], 1)
    assert [slot.index for slot, _ in sched.next_batches()] == [1]


def test_turns_survive_an_instance_leaving():
    sched = DefaultScheduler()
    _slots(sched, ["host-a", "host-b", "host-c"])
    assert _one_at_a_time(sched, 2) == [0, 1]
    sched.remove_slots("host-c")
    assert _one_at_a_time(sched, 4) == [0, 1, 0, 1]


def test_dynamic_batcher_takes_turns_over_the_instances():
    sched = DynamicBatcher(BatchRules(max_batch_size=8, delay_s=0.0, preferred=()), lambda: None)
    _slots(sched, ["host-a", "host-b"])
    assert _one_at_a_time(sched, 4) == [0, 1, 0, 1]
