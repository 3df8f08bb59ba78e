"""bge-m3 output heads, computed exactly as FlagEmbedding's M3Embedder does, with tensor operations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bgeserve.models.packed import PackedBatch


def pool_dense(hidden: torch.Tensor, batch: PackedBatch, pooling: str, normalize: bool) -> torch.Tensor:
    """Sentence vectors [batch, hidden] from packed hidden states [T, hidden]: each sequence's CLS row or
    the mean of its rows, L2-normalised when asked. `pooling="rows"`: `hidden` already holds one row per
    sequence (a forward pass that computed the CLS rows only)."""
    if pooling == "rows":
        pooled = hidden
    elif pooling == "cls":
        pooled = hidden[batch.starts]
    else:
        sums = hidden.new_zeros(len(batch.lengths), hidden.shape[-1]).index_add_(0, batch.segment, hidden)
        pooled = sums / torch.tensor(batch.lengths, dtype=hidden.dtype, device=hidden.device).unsqueeze(-1)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def token_weights(hidden: torch.Tensor, sparse_linear: torch.nn.Linear) -> torch.Tensor:
    """relu(sparse_linear(H)) per token: [T, hidden] -> [T]."""
    return torch.relu(sparse_linear(hidden)).squeeze(-1)


def colbert_vectors(hidden: torch.Tensor, colbert_linear: torch.nn.Linear) -> torch.Tensor:
    """L2-normalised colbert_linear(H) per token: [T, hidden] -> [T, dim] (CLS rows included)."""
    return F.normalize(colbert_linear(hidden), dim=-1)


def lexical_weights(
    weights: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, unused_ids: torch.Tensor
) -> list[dict[str, float]]:
    """Per item: {token id as str: max weight over its positions}, special ids and weights <= 0 dropped.

    Keys come in the order of each id's first kept position, as FlagEmbedding builds its dicts.
    Vectorised over the whole batch: one unique + two scatter-reduces, no per-token Python loop.
    """
    weights = weights.float().cpu()
    input_ids = input_ids.cpu()
    keep = mask.cpu().bool() & (weights > 0) & ~torch.isin(input_ids, unused_ids.cpu())
    item, pos = keep.nonzero(as_tuple=True)
    tokens, values = input_ids[item, pos], weights[item, pos]
    stride = int(input_ids.max().item()) + 1 if input_ids.numel() else 1
    uniq, inverse = torch.unique(item * stride + tokens, return_inverse=True)
    best = torch.zeros(len(uniq)).scatter_reduce(0, inverse, values, "amax", include_self=False)
    first = torch.zeros(len(uniq), dtype=torch.long).scatter_reduce(0, inverse, pos, "amin", include_self=False)
    owner = uniq // stride
    order = torch.argsort(owner * (input_ids.shape[1] + 1) + first)
    owners, token_ids, maxima = owner[order].tolist(), (uniq % stride)[order].tolist(), best[order].tolist()
    result: list[dict[str, float]] = [{} for _ in range(input_ids.shape[0])]
    for b, tid, w in zip(owners, token_ids, maxima, strict=True):
        result[b][str(tid)] = w
    return result
