"""bge-m3 pair scores for /rerank and /score, from outputs of one forward pass per text."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bgeserve.core import ItemOutput
from bgeserve.errors import InvalidInput
from bgeserve.scoring import colbert_score, compute_lexical_matching_score

# Weights whose largest lies outside this range are divided by it first: a weighted mean does not
# change, but 1e308 * score no longer overflows (every score inf/nan) and 1e-320 keeps its precision.
_PLAIN_WEIGHTS = (1e-100, 1e100)


def check_weights(weights: Sequence[float] | None) -> None:
    """weights_for_different_modes must give defined means: none negative, dense + sparse above zero."""
    if weights is None:
        return
    if any(w < 0 for w in weights):
        raise _weights_error("weights_for_different_modes must not be negative")
    if weights[0] + weights[1] <= 0:
        raise _weights_error("weights_for_different_modes must not sum to zero: dense + sparse must be above 0")


def _weights_error(message: str) -> InvalidInput:
    error = InvalidInput(message)
    error.param = "weights_for_different_modes"  # type: ignore[attr-defined]
    return error


def dense_scores(queries: Sequence[ItemOutput], passages: Sequence[ItemOutput]) -> list[float]:
    """Inner products of the (normalised) dense vectors, pair by pair."""
    return [float(np.dot(q.dense, p.dense)) for q, p in zip(queries, passages, strict=True)]


def hybrid_scores(
    queries: Sequence[ItemOutput], passages: Sequence[ItemOutput], weights: Sequence[float]
) -> dict[str, list[float]]:
    """The five lists of FlagEmbedding's compute_score for query/passage pairs, finite and in the same
    order as exact arithmetic gives for any weights `check_weights` lets through."""
    check_weights(weights)
    dense = np.asarray(dense_scores(queries, passages), dtype=np.float64)
    pairs = list(zip(queries, passages, strict=True))
    sparse = np.asarray(
        [compute_lexical_matching_score(q.lexical_weights, p.lexical_weights) for q, p in pairs], dtype=np.float64
    )
    colbert = np.asarray([colbert_score(q.colbert, p.colbert) for q, p in pairs], dtype=np.float64)
    # compute_score's formulas (bgeserve.scoring.combine_scores), each mean scaled by its own weights.
    w0, w1, _ = _in_range(weights[:2], weights)
    sparse_dense = (w0 * dense + w1 * sparse) / (w0 + w1)
    w0, w1, w2 = _in_range(weights, weights)
    all_three = (w0 * dense + w1 * sparse + w2 * colbert) / (w0 + w1 + w2)
    return {
        "colbert": colbert.tolist(),
        "sparse": sparse.tolist(),
        "dense": dense.tolist(),
        "sparse+dense": sparse_dense.tolist(),
        "colbert+sparse+dense": all_three.tolist(),
    }


def _in_range(used: Sequence[float], weights: Sequence[float]) -> list[float]:
    """`weights` as they are, or divided by the largest of `used` (the weights of one mean) when that is
    so large or small that the products would overflow or lose precision."""
    top = max(used)
    if _PLAIN_WEIGHTS[0] <= top <= _PLAIN_WEIGHTS[1]:
        return [float(w) for w in weights]
    return [float(w) / top for w in weights]
