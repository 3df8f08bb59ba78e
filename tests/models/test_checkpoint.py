"""Checkpoint discovery: layouts, heads, limits, and clear errors for bad paths."""

from __future__ import annotations

import json
import shutil

import pytest

from bgeserve.core import OutputRequest
from bgeserve.errors import InvalidCheckpoint, ModelLacksOutput, ModelNotFound
from bgeserve.models.checkpoint import load_checkpoint
from bgeserve.runtime.torch_backend import TorchBackend


def test_bundled_model_is_the_default():
    ckpt = load_checkpoint(None)
    assert ckpt.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert ckpt.pooling == "mean"
    # sentence_bert_config.json caps MiniLM at 256 tokens, as sentence-transformers does.
    assert ckpt.max_length == 256
    assert not ckpt.capabilities.sparse and not ckpt.capabilities.colbert


def test_m3_layout(m3_checkpoint):
    ckpt = load_checkpoint(str(m3_checkpoint))
    assert ckpt.pooling == "cls"
    assert ckpt.capabilities.sparse and ckpt.capabilities.colbert
    assert ckpt.weights_file.name == "pytorch_model.bin"
    assert ckpt.max_length == ckpt.config.max_position_embeddings - 2
    assert ckpt.unused_token_ids == frozenset({0, 1, 2, 3})


def test_safetensors_preferred(m3_checkpoint_safetensors):
    assert load_checkpoint(str(m3_checkpoint_safetensors)).weights_file.name == "model.safetensors"


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope" / "deeper"))


def test_hub_id_offline_says_how_to_pass_a_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="--model DIR"):
        load_checkpoint("BAAI/definitely-not-cached-model")


def test_directory_without_config(tmp_path):
    with pytest.raises(InvalidCheckpoint, match="config.json"):
        load_checkpoint(str(tmp_path))


def test_unsupported_architecture(tmp_path, m3_checkpoint):
    target = tmp_path / "gpt"
    shutil.copytree(m3_checkpoint, target)
    cfg = json.loads((target / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (target / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidCheckpoint, match="gpt2"):
        load_checkpoint(str(target))


def test_model_without_heads_refuses_sparse_with_typed_error(tmp_path, m3_checkpoint):
    target = tmp_path / "noheads"
    shutil.copytree(m3_checkpoint, target)
    (target / "sparse_linear.pt").unlink()
    (target / "colbert_linear.pt").unlink()
    backend = TorchBackend(load_checkpoint(str(target)))
    with pytest.raises(ModelLacksOutput, match="sparse_linear.pt"):
        backend.run([[0, 5, 2]], OutputRequest(sparse=True))
    with pytest.raises(ModelLacksOutput, match="colbert_linear.pt"):
        backend.run([[0, 5, 2]], OutputRequest(colbert=True))
    assert backend.run([[0, 5, 2]], OutputRequest())[0].dense.shape == (backend.hidden_size,)


def test_truncation_keeps_special_tokens(m3_checkpoint):
    tok = load_checkpoint(str(m3_checkpoint)).tokenizer
    text = "word " * 100
    right = tok.encode([text], max_length=10)
    assert right.truncated == [True] and len(right.ids[0]) == 10
    assert right.ids[0][0] == 0 and right.ids[0][-1] == 2
    assert right.ids[0] == [0, *tok.encode([text], max_length=512).ids[0][1:9], 2]  # the first 8 body tokens
    # Left truncation keeps the last 8 body tokens: the text's end, framed by <s> ... </s>.
    tailed = "start " + text + "the very end"
    body = tok.encode([tailed], max_length=512).ids[0][1:-1]
    left = tok.encode([tailed], max_length=10, direction="left")
    assert left.truncated == [True] and left.ids[0] == [0, *body[-8:], 2]
    assert tok.decode(left.ids[0]).endswith("the very end")
    whole = tok.encode([text], max_length=10, truncate=False)
    assert whole.truncated == [False] and len(whole.ids[0]) == whole.full_lengths[0] > 10
