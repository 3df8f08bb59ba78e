"""The whole model: encoder plus the optional bge-m3 heads, built from a Checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from bgeserve.errors import InvalidCheckpoint
from bgeserve.models.checkpoint import Checkpoint
from bgeserve.models.encoder import TransformerEncoder
from bgeserve.models.packed import PackedBatch


def _linear_from_state(state: dict[str, torch.Tensor], name: str) -> nn.Linear:
    try:
        weight, bias = state["weight"], state["bias"]
    except KeyError as exc:
        raise InvalidCheckpoint(f"{name} must hold 'weight' and 'bias'") from exc
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    # Upstream stores the heads in fp16; they are used at the encoder's precision.
    layer.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return layer


class EmbeddingModel(nn.Module):
    """Encoder + sparse_linear + colbert_linear (the heads only when the checkpoint has them)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        with torch.device("meta"):
            self.encoder = TransformerEncoder(checkpoint.config)
        self.encoder.load_hf_state_dict(checkpoint.load_weights())
        self.sparse_linear = (
            _linear_from_state(checkpoint.load_head(checkpoint.sparse_head), checkpoint.sparse_head.name)
            if checkpoint.sparse_head
            else None
        )
        self.colbert_linear = (
            _linear_from_state(checkpoint.load_head(checkpoint.colbert_head), checkpoint.colbert_head.name)
            if checkpoint.colbert_head
            else None
        )
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state [batch, seq, hidden]."""
        return self.encoder(input_ids, attention_mask)

    def forward_packed(self, batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden state of every real token, [T, hidden]; of `rows` only, when given."""
        return self.encoder.forward_packed(batch, rows)
