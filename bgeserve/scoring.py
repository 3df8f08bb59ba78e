"""Scores between bge-m3 outputs, as FlagEmbedding's BGEM3FlagModel computes them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_WEIGHTS = (1.0, 1.0, 1.0)


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


def combine_scores(
    dense: Sequence[float], sparse: Sequence[float], colbert: Sequence[float], weights: Sequence[float]
) -> dict[str, list[float]]:
    """The five lists of compute_score: each mode alone, then the weighted means."""
    if len(weights) != 3:
        raise ValueError("weights_for_different_modes needs three numbers: dense, sparse, colbert")
    w0, w1, w2 = (float(w) for w in weights)
    if w0 + w1 == 0 or w0 + w1 + w2 == 0:
        raise ValueError("weights_for_different_modes must not sum to zero")
    d, s, c = (np.asarray(x, dtype=np.float64) for x in (dense, sparse, colbert))
    return {
        "colbert": c.tolist(),
        "sparse": s.tolist(),
        "dense": d.tolist(),
        "sparse+dense": ((w0 * d + w1 * s) / (w0 + w1)).tolist(),
        "colbert+sparse+dense": ((w0 * d + w1 * s + w2 * c) / (w0 + w1 + w2)).tolist(),
    }
