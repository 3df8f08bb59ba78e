"""The encoder's shape, read from a Hugging Face `config.json` (BERT and XLM-RoBERTa families)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bgeserve.errors import InvalidCheckpoint

SUPPORTED_MODEL_TYPES = ("bert", "xlm-roberta", "roberta")


@dataclass(frozen=True)
class EncoderConfig:
    """What the forward pass needs to know about a checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int

    @property
    def uses_roberta_positions(self) -> bool:
        """XLM-R numbers positions from pad_token_id + 1 and skips padding."""
        return self.model_type in ("xlm-roberta", "roberta")

    @property
    def max_tokens(self) -> int:
        """Longest input (special tokens included) the position table allows."""
        if self.uses_roberta_positions:
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_file(cls, path: Path) -> EncoderConfig:
        """Reads config.json; raises InvalidCheckpoint for architectures we do not run."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidCheckpoint(f"cannot read {path}: {exc}") from exc
        model_type = raw.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidCheckpoint(
                f"{path}: model_type {model_type!r} is not supported "
                f"(bgeserve runs {', '.join(SUPPORTED_MODEL_TYPES)} encoders)"
            )
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise InvalidCheckpoint(f"{path}: only absolute position embeddings are supported")
        try:
            return cls(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=int(raw["num_attention_heads"]),
                intermediate_size=int(raw["intermediate_size"]),
                max_position_embeddings=int(raw["max_position_embeddings"]),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                hidden_act=str(raw.get("hidden_act", "gelu")),
                pad_token_id=int(raw.get("pad_token_id", 1 if model_type != "bert" else 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidCheckpoint(f"{path}: missing or bad field {exc}") from exc
