"""The one protocol every runtime (torch, onnxruntime) implements; the engine never asks which it has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bgeserve.errors import ModelLacksOutput

# The bge-m3 head files; a checkpoint without one cannot give that output.
SPARSE_HEAD_FILE = "sparse_linear.pt"
COLBERT_HEAD_FILE = "colbert_linear.pt"


@dataclass(frozen=True)
class OutputRequest:
    """Which outputs one forward pass must produce."""

    dense: bool = True
    sparse: bool = False
    colbert: bool = False
    # Raw last hidden states of every token (TEI's /embed_all).
    token_embeddings: bool = False
    normalize_dense: bool = True


@dataclass
class ItemOutput:
    """Everything computed for one input sequence, on the host, as numpy."""

    num_tokens: int
    dense: np.ndarray | None = None  # [hidden] float32
    lexical_weights: dict[str, float] | None = None  # token id (decimal str) -> weight
    colbert: np.ndarray | None = None  # [num_tokens - 1, hidden] float32
    token_embeddings: np.ndarray | None = None  # [num_tokens, hidden] float32


@dataclass(frozen=True)
class Capabilities:
    """What a loaded model can return."""

    dense: bool
    sparse: bool
    colbert: bool

    def require(self, want: OutputRequest, model: str) -> None:
        """Raises ModelLacksOutput when `want` asks for a head this model does not have."""
        if want.sparse and not self.sparse:
            raise ModelLacksOutput("sparse lexical weights", model, SPARSE_HEAD_FILE)
        if want.colbert and not self.colbert:
            raise ModelLacksOutput("ColBERT vectors", model, COLBERT_HEAD_FILE)


class Backend(Protocol):
    """Runs the model on batches of token ids on one device."""

    device: str
    dtype: str
    hidden_size: int
    capabilities: Capabilities

    def run(self, batch: list[list[int]], want: OutputRequest) -> list[ItemOutput]:
        """Encodes each id sequence (already tokenised, truncated, with special tokens)."""
        ...
