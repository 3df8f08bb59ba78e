"""Percentile math: the latency columns must mean what numpy users expect."""

from __future__ import annotations

import numpy as np
import pytest

from bgeserve.bench.stats import median, percentile, summarize


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy_linear(q):
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 10, 101):
        samples = list(rng.exponential(50.0, size=n))
        assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)), rel=1e-12)


def test_percentile_known_values():
    samples = [40.0, 10.0, 30.0, 20.0]  # order does not matter
    assert percentile(samples, 0) == 10.0
    assert percentile(samples, 100) == 40.0
    assert median(samples) == 25.0
    assert percentile(samples, 95) == pytest.approx(38.5)  # 30 + 0.85 * (40 - 30)


def test_percentile_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize():
    assert summarize([]) is None
    s = summarize([float(x) for x in range(1, 101)])
    assert (s.n, s.p50, s.mean) == (100, 50.5, 50.5)
    assert s.p95 == pytest.approx(95.05) and s.p99 == pytest.approx(99.01)
    assert set(s.as_dict()) == {"p50", "p95", "p99", "mean", "n"}
