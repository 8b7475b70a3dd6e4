"""common/batching.Batcher, the one dynamic batcher, on a real event loop: a full batch is
due at once, a partial one only once its oldest item has waited the queue delay (and only
for a free instance), the timer wakes its owner then, cancelled items leave the queue in
order, and a drained batcher wakes nobody. Also the scheduler's DynamicBatcher, which
holds one by composition, pairing batches with its instances."""

from __future__ import annotations

import asyncio

from despina.common import messages as m
from despina.common.batching import Batcher, BatchRules
from despina.services.scheduler.dynamic_batcher import DynamicBatcher
from despina.services.scheduler.interface import Pending, Slot


def run(scenario):
    return asyncio.run(scenario())


def test_a_full_batch_is_due_at_once_and_taken_in_order():
    async def scenario():
        batcher: Batcher[str] = Batcher(BatchRules(4, 60.0, ()), lambda: None)
        for name in "abcde":
            batcher.add(name, 1)
        count = batcher.due()
        return count, batcher.take(count), list(batcher.items), list(batcher.sizes)

    assert run(scenario) == (4, ["a", "b", "c", "d"], ["e"], [1])


def test_a_preferred_size_is_due_at_once():
    async def scenario():
        batcher: Batcher[str] = Batcher(BatchRules(8, 60.0, (2, 4)), lambda: None)
        for name, size in (("a", 1), ("b", 2), ("c", 1), ("d", 1)):
            batcher.add(name, size)
        return batcher.due()

    assert run(scenario) == 3  # 1 + 2 + 1 rows: the preferred 4


def test_a_partial_batch_waits_for_the_timer_then_is_due_for_a_free_instance_only():
    async def scenario():
        woke = asyncio.Event()
        batcher: Batcher[str] = Batcher(BatchRules(8, 0.02, ()), woke.set)
        batcher.add("a", 1)
        batcher.add("b", 3)
        before = batcher.due()
        batcher.arm()
        await asyncio.wait_for(woke.wait(), 5.0)
        return before, batcher.due(may_wait_out=False), batcher.due()

    assert run(scenario) == (0, 0, 2)


def test_arming_again_replaces_the_timer_and_an_empty_batcher_arms_none():
    async def scenario():
        wakes: list[int] = []
        batcher: Batcher[str] = Batcher(BatchRules(8, 0.0, ()), lambda: wakes.append(1))
        batcher.arm()  # nothing queued
        batcher.add("a", 1)
        batcher.arm()
        batcher.arm()
        await asyncio.sleep(0.05)
        return wakes

    assert run(scenario) == [1]


def test_remove_takes_the_picked_items_and_keeps_the_others_aligned():
    async def scenario():
        batcher: Batcher[str] = Batcher(BatchRules(8, 60.0, ()), lambda: None)
        for name, size in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
            batcher.add(name, size)
        arrivals = list(batcher.arrivals)
        dropped = batcher.remove(lambda item: item in ("b", "d"))
        nothing = batcher.remove(lambda item: item == "z")
        return (
            dropped,
            nothing,
            list(batcher.items),
            list(batcher.sizes),
            list(batcher.arrivals) == [arrivals[0], arrivals[2]],
        )

    assert run(scenario) == (["b", "d"], [], ["a", "c"], [1, 3], True)


def test_drain_empties_the_queue_and_stops_the_timer():
    async def scenario():
        wakes: list[int] = []
        batcher: Batcher[str] = Batcher(BatchRules(8, 0.01, ()), lambda: wakes.append(1))
        batcher.add("a", 1)
        batcher.add("b", 1)
        batcher.arm()
        drained = batcher.drain()
        await asyncio.sleep(0.05)
        return drained, len(batcher), wakes

    assert run(scenario) == (["a", "b"], 0, [])


def pending(rid: int, rows: int = 1) -> Pending:
    tensor = m.Tensor("INPUT0", "FP32", [rows, 4], m.Inline(rid))
    return Pending(b"fe", m.Infer(rid, "probe", "1", [tensor], [], {}))


def test_dynamic_batcher_sends_a_partial_batch_to_a_free_instance_after_the_delay():
    async def scenario():
        woke = asyncio.Event()
        sched = DynamicBatcher(BatchRules(4, 0.02, ()), woke.set)
        slot = Slot(host=None, model="probe", version="1", index=0)
        sched.add_slot(slot)
        for rid in (1, 2, 3):
            sched.enqueue(pending(rid))
        early = sched.next_batches()
        await asyncio.wait_for(woke.wait(), 5.0)
        batches = sched.next_batches()
        return early, [(s.index, [p.request.rid for p in b]) for s, b in batches], slot.busy

    assert run(scenario) == ([], [(0, [1, 2, 3])], 1)


def test_dynamic_batcher_sends_ahead_to_a_busy_instance_only_a_full_batch():
    async def scenario():
        sched = DynamicBatcher(BatchRules(4, 60.0, ()), lambda: None)
        slot = Slot(host=None, model="probe", version="1", index=0, busy=1)
        sched.add_slot(slot)
        sched.enqueue(pending(1, rows=2))
        partial = sched.next_batches()
        sched.enqueue(pending(2, rows=2))
        full = sched.next_batches()
        left = sched.drain_queue()
        return partial, [[p.request.rid for p in b] for _, b in full], slot.busy, left

    assert run(scenario) == ([], [[1, 2]], 2, [])
