"""The one protocol every runtime (torch, onnxruntime) implements; the engine never asks which it has."""

from __future__ import annotations

from typing import Protocol

from bgeserve.core import Capabilities, ItemOutput, OutputRequest


class Backend(Protocol):
    """Runs the model on batches of token ids on one device."""

    device: str
    dtype: str
    hidden_size: int
    capabilities: Capabilities

    def run(self, batch: list[list[int]], want: OutputRequest) -> list[ItemOutput]:
        """Encodes each id sequence (already tokenised, truncated, with special tokens)."""
        ...
