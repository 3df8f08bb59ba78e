"""Per-sequence results from a packed forward pass: the same post-processing for every backend."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bgeserve.core import Capabilities, ItemOutput, OutputRequest
from bgeserve.models.checkpoint import Checkpoint
from bgeserve.models.heads import lexical_weights, pool_dense
from bgeserve.models.packed import PackedBatch


@dataclass
class PackedResult:
    """What a backend computed for a packed batch, one row per token, or per sequence when `cls_only` (host
    or device tensors)."""

    hidden: torch.Tensor  # [T, hidden] last hidden state; [B, hidden] when cls_only
    token_weights: torch.Tensor | None = None  # [T] relu(sparse_linear(H)), when sparse was asked for
    colbert: torch.Tensor | None = None  # [T, dim] normalised colbert_linear(H), CLS rows included
    cls_only: bool = False  # hidden holds each sequence's CLS row only (see cls_rows_suffice)


def cls_rows_suffice(want: OutputRequest, pooling: str) -> bool:
    """Whether the CLS rows are all that `want` reads of the last hidden state: a CLS-pooled dense vector and
    nothing per token. The last layer then runs on those rows only past its attention: its attention-output
    and feed-forward products (3/4 of a layer's, ~3% of bge-m3's) on 1 row a text instead of all."""
    return want.dense and pooling == "cls" and not (want.sparse or want.colbert or want.token_embeddings)


class PackedBackend:
    """The frame every runtime shares (implements runtime.backend.Backend with its subclass): checks the
    outputs asked for, lets the subclass's `_forward` compute per-token results for the packed batch, and
    pools and splits them into one ItemOutput per sequence. Subclasses set `device` and `dtype`."""

    device: str
    dtype: str

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.hidden_size = checkpoint.hidden_size
        self.capabilities: Capabilities = checkpoint.capabilities
        self._pad_id = checkpoint.config.pad_token_id
        self._unused_ids = torch.tensor(sorted(checkpoint.unused_token_ids), dtype=torch.long)

    @torch.inference_mode()
    def run(self, batch: list[list[int]], want: OutputRequest) -> list[ItemOutput]:
        """Encodes id sequences (special tokens included); returns one ItemOutput per sequence."""
        self.capabilities.require(want, self.checkpoint.name)
        if not batch:
            return []
        packed, result = self._forward(batch, want)
        return items_from_packed(packed, result, want, self.checkpoint.pooling, self._pad_id, self._unused_ids)

    def _forward(self, batch: list[list[int]], want: OutputRequest) -> tuple[PackedBatch, PackedResult]:
        raise NotImplementedError


def items_from_packed(
    batch: PackedBatch,
    result: PackedResult,
    want: OutputRequest,
    pooling: str,
    pad_id: int,
    unused_ids: torch.Tensor,
) -> list[ItemOutput]:
    """Pools, builds lexical weights, drops each sequence's CLS row from its ColBERT vectors, splits."""
    items = [ItemOutput(num_tokens=n) for n in batch.lengths]
    if want.dense:
        dense = pool_dense(result.hidden, batch, "rows" if result.cls_only else pooling, want.normalize_dense)
        for item, vec in zip(items, _to_numpy(dense), strict=True):
            item.dense = vec
    if want.sparse:
        if result.token_weights is None:
            raise ValueError("sparse output asked for but no token weights computed")
        weights = batch.pad(result.token_weights)
        per_item = lexical_weights(weights, batch.pad(batch.ids, pad_id), batch.mask(), unused_ids)
        for item, lw in zip(items, per_item, strict=True):
            item.lexical_weights = lw
    if want.colbert:
        if result.colbert is None:
            raise ValueError("ColBERT output asked for but no ColBERT vectors computed")
        rows = _to_numpy(result.colbert)
        for item, start in zip(items, batch.starts.tolist(), strict=True):
            item.colbert = rows[start + 1 : start + item.num_tokens]
    if want.token_embeddings:
        rows = _to_numpy(result.hidden)
        for item, start in zip(items, batch.starts.tolist(), strict=True):
            item.token_embeddings = rows[start : start + item.num_tokens]
    return items


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy()
