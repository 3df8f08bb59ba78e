"""Scores between bge-m3 outputs, as FlagEmbedding's BGEM3FlagModel computes them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_WEIGHTS = (1.0, 1.0, 1.0)
# Weights outside this range are scaled before use (see `_in_range`).
_PLAIN_WEIGHTS = (1e-100, 1e100)


def lexical_matching_score(a: dict[str, float], b: dict[str, float]) -> float:
    """Sum over shared tokens of a[token] * b[token]."""
    if len(b) < len(a):
        a, b = b, a
    return float(sum(w * b[t] for t, w in a.items() if t in b))


def compute_lexical_matching_score(
    a: dict[str, float] | list[dict[str, float]], b: dict[str, float] | list[dict[str, float]]
) -> float | np.ndarray:
    """One score for two dicts, or the matrix of scores for two lists."""
    if isinstance(a, dict) and isinstance(b, dict):
        return lexical_matching_score(a, b)
    if isinstance(a, list) and isinstance(b, list):
        return np.array([[lexical_matching_score(x, y) for y in b] for x in a])
    raise ValueError("lexical weights must be two dicts or two lists of dicts")


def colbert_score(q_reps: np.ndarray, p_reps: np.ndarray) -> float:
    """Mean over query vectors of the best dot product with any passage vector."""
    q = np.asarray(q_reps, dtype=np.float32)
    p = np.asarray(p_reps, dtype=np.float32)
    if q.shape[0] == 0 or p.shape[0] == 0:
        return 0.0
    return float((q @ p.T).max(axis=1).sum() / q.shape[0])


def pair_scores(
    dense: tuple[Sequence[np.ndarray], Sequence[np.ndarray]],
    lexical: tuple[Sequence[dict[str, float]], Sequence[dict[str, float]]],
    colbert: tuple[Sequence[np.ndarray], Sequence[np.ndarray]],
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> dict[str, list[float]]:
    """compute_score for query/passage pairs: each argument holds the queries' and the passages' outputs
    of one kind, in pair order."""
    return combine_scores(
        dense=[float(np.dot(q, p)) for q, p in zip(*dense, strict=True)],
        sparse=[lexical_matching_score(q, p) for q, p in zip(*lexical, strict=True)],
        colbert=[colbert_score(q, p) for q, p in zip(*colbert, strict=True)],
        weights=weights,
    )


def combine_scores(
    dense: Sequence[float], sparse: Sequence[float], colbert: Sequence[float], weights: Sequence[float]
) -> dict[str, list[float]]:
    """The five lists of compute_score: each mode alone, then the weighted means (finite, and in the order
    exact arithmetic gives, for any weights of one sign whose sums are not zero)."""
    if len(weights) != 3:
        raise ValueError("weights_for_different_modes needs three numbers: dense, sparse, colbert")
    if weights[0] + weights[1] == 0 or sum(weights) == 0:
        raise ValueError("weights_for_different_modes must not sum to zero")
    d, s, c = (np.asarray(x, dtype=np.float64) for x in (dense, sparse, colbert))
    w0, w1, _ = _in_range(weights[:2], weights)
    sparse_dense = (w0 * d + w1 * s) / (w0 + w1)
    w0, w1, w2 = _in_range(weights, weights)
    all_three = (w0 * d + w1 * s + w2 * c) / (w0 + w1 + w2)
    return {
        "colbert": c.tolist(),
        "sparse": s.tolist(),
        "dense": d.tolist(),
        "sparse+dense": sparse_dense.tolist(),
        "colbert+sparse+dense": all_three.tolist(),
    }


def _in_range(used: Sequence[float], weights: Sequence[float]) -> list[float]:
    """`weights` as they are, or divided by the largest of `used` (the weights of one mean) when that is
    so large or small that 1e308 * score would overflow (every score inf) or 1e-320 lose its precision;
    the weighted mean does not change."""
    top = max(abs(w) for w in used)
    if _PLAIN_WEIGHTS[0] <= top <= _PLAIN_WEIGHTS[1]:
        return [float(w) for w in weights]
    return [float(w) / top for w in weights]
