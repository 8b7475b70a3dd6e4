"""Batch planning is a pure function: table-tested."""

from __future__ import annotations

import pytest

from despina.services.scheduler.dynamic_batcher import plan_batch


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
