"""The one protocol every runtime (torch, onnxruntime) implements; the engine never asks which it has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


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


class Backend(Protocol):
    """Runs the model on batches of token ids on one device."""

    device: str
    dtype: str
    hidden_size: int
    capabilities: Capabilities

    def run(self, batch: list[list[int]], want: OutputRequest) -> list[ItemOutput]:
        """Encodes each id sequence (already tokenised, truncated, with special tokens)."""
        ...
