"""bge-m3 pair scores for /rerank and /score, from outputs of one forward pass per text."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bgeserve.errors import InvalidInput
from bgeserve.runtime.backend import ItemOutput
from bgeserve.scoring import colbert_score, combine_scores, compute_lexical_matching_score


def dense_scores(queries: Sequence[ItemOutput], passages: Sequence[ItemOutput]) -> list[float]:
    """Inner products of the (normalised) dense vectors, pair by pair."""
    return [float(np.dot(q.dense, p.dense)) for q, p in zip(queries, passages, strict=True)]


def hybrid_scores(
    queries: Sequence[ItemOutput], passages: Sequence[ItemOutput], weights: Sequence[float]
) -> dict[str, list[float]]:
    """The five lists of FlagEmbedding's compute_score for query/passage pairs."""
    if any(w < 0 for w in weights):
        raise InvalidInput("weights_for_different_modes must not be negative")
    dense = dense_scores(queries, passages)
    sparse = [
        float(compute_lexical_matching_score(q.lexical_weights, p.lexical_weights))
        for q, p in zip(queries, passages, strict=True)
    ]
    colbert = [colbert_score(q.colbert, p.colbert) for q, p in zip(queries, passages, strict=True)]
    try:
        return combine_scores(dense, sparse, colbert, weights)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
