"""Token-budget batch planning."""

from __future__ import annotations

import pytest

from bgeserve.engine.batching import plan_batches


def test_every_item_once_longest_first_within_budget():
    lengths = [5, 100, 30, 30, 7, 64, 1, 99]
    batches = plan_batches(lengths, max_batch_tokens=200, max_batch_size=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for b in batches:
        assert len(b) <= 3
        assert len(b) * max(lengths[i] for i in b) <= 200


def test_item_longer_than_budget_runs_alone():
    assert plan_batches([500, 10], max_batch_tokens=100, max_batch_size=8) == [[0], [1]]


def test_empty_and_invalid():
    assert plan_batches([], 100, 8) == []
    with pytest.raises(ValueError):
        plan_batches([1], 0, 8)
