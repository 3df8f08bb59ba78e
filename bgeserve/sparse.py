"""Lexical weights (token id -> weight) in the shapes clients take: TEI's list and vector databases' pairs."""

from __future__ import annotations

from collections.abc import Mapping


def sorted_weights(weights: Mapping[str, float]) -> list[tuple[int, float]]:
    """(token id, weight) pairs sorted by token id."""
    return sorted((int(token), float(value)) for token, value in weights.items())


def tei_sparse_values(weights: Mapping[str, float]) -> list[dict[str, float | int]]:
    """TEI's `[{"index": token_id, "value": weight}]`, sorted by token id."""
    return [{"index": index, "value": value} for index, value in sorted_weights(weights)]


def sparse_vector(weights: Mapping[str, float]) -> dict[str, list]:
    """`{"indices": [...], "values": [...]}` sorted by token id, e.g. `qdrant_client.models.SparseVector(**v)`."""
    pairs = sorted_weights(weights)
    return {"indices": [index for index, _ in pairs], "values": [value for _, value in pairs]}
