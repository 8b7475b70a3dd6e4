"""Batch planning and the batching rules read from a config are pure functions: table-tested."""

from __future__ import annotations

import pytest

from despina.common.batching import BatchRules, batch_rules, plan_batch


@pytest.mark.parametrize(
    "sizes,max_batch,preferred,expected",
    [
        ([], 8, [], (0, False)),
        ([1], 8, [], (1, False)),  # wait for more, or for the delay
        ([1] * 8, 8, [], (8, True)),  # full
        ([1] * 10, 8, [], (8, True)),  # more than a batch waiting
        ([3, 3, 3], 8, [], (2, True)),  # the third does not fit: 6 is as full as it gets
        ([4, 4], 8, [], (2, True)),
        ([1, 1, 1, 1], 8, [4], (4, True)),  # a preferred size is reached
        ([1, 1, 1], 8, [4], (3, False)),
        ([2, 2, 1], 8, [4, 6], (2, True)),  # largest preferred size reachable in order
        ([1, 1, 1, 1, 1], 8, [2, 4], (4, True)),
    ],
)
def test_plan_batch(sizes, max_batch, preferred, expected):
    assert plan_batch(sizes, max_batch, preferred) == expected


@pytest.mark.parametrize(
    "config,expected",
    [
        ({"max_batch_size": 8}, None),  # no dynamic_batching
        ({"max_batch_size": 0, "dynamic_batching": {}}, None),  # cannot batch
        ({"max_batch_size": 8, "dynamic_batching": {}}, BatchRules(8, 0.0, ())),
        (
            {
                "max_batch_size": 8,
                "dynamic_batching": {
                    "max_queue_delay_microseconds": 500,
                    "preferred_batch_size": [8, 4, 16, 0],
                },
            },
            BatchRules(8, 0.0005, (4, 8)),  # sorted, and only sizes a batch can have
        ),
    ],
)
def test_batch_rules_from_triton_json(config, expected):
    assert batch_rules(config) == expected
