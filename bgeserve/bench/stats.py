"""Percentiles and medians of timing samples (no numpy needed, so the HTTP load generator stays light)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics.

    Same definition as numpy's default (`method="linear"`): rank = q/100 * (n - 1).
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    rank = q / 100.0 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(samples: Sequence[float]) -> float:
    """The 50th percentile."""
    return percentile(samples, 50.0)


@dataclass(frozen=True)
class LatencySummary:
    """p50/p95/p99 and mean of latency samples in milliseconds; `n` says how many samples back them."""

    p50: float
    p95: float
    p99: float
    mean: float
    n: int

    def as_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return asdict(self)


def summarize(samples_ms: Sequence[float]) -> LatencySummary | None:
    """Latency summary of samples in milliseconds, or None when there are none."""
    if not samples_ms:
        return None
    return LatencySummary(
        p50=percentile(samples_ms, 50.0),
        p95=percentile(samples_ms, 95.0),
        p99=percentile(samples_ms, 99.0),
        mean=sum(samples_ms) / len(samples_ms),
        n=len(samples_ms),
    )
