"""bge-m3 pair scores for /rerank and /score, from outputs of one forward pass per text."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bgeserve.core import ItemOutput, asked
from bgeserve.errors import InvalidInput
from bgeserve.scoring import pair_scores


def check_weights(weights: Sequence[float] | None) -> None:
    """weights_for_different_modes must give defined means: none negative, dense + sparse above zero."""
    if weights is None:
        return
    if any(w < 0 for w in weights):
        raise _weights_error("weights_for_different_modes must not be negative")
    if weights[0] + weights[1] <= 0:
        raise _weights_error("weights_for_different_modes must not sum to zero: dense + sparse must be above 0")


def _weights_error(message: str) -> InvalidInput:
    return InvalidInput(message, "weights_for_different_modes")


def dense_scores(queries: Sequence[ItemOutput], passages: Sequence[ItemOutput]) -> list[float]:
    """Inner products of the (normalised) dense vectors, pair by pair."""
    q_dense, p_dense = asked([q.dense for q in queries]), asked([p.dense for p in passages])
    return [float(np.dot(q, p)) for q, p in zip(q_dense, p_dense, strict=True)]


def hybrid_scores(
    queries: Sequence[ItemOutput], passages: Sequence[ItemOutput], weights: Sequence[float]
) -> dict[str, list[float]]:
    """The five lists of FlagEmbedding's compute_score for query/passage pairs."""
    check_weights(weights)
    return pair_scores(
        dense=(asked([q.dense for q in queries]), asked([p.dense for p in passages])),
        lexical=(asked([q.lexical_weights for q in queries]), asked([p.lexical_weights for p in passages])),
        colbert=(asked([q.colbert for q in queries]), asked([p.colbert for p in passages])),
        weights=weights,
    )

