"""Our plain-torch encoder against transformers' AutoModel on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from bgeserve.models.checkpoint import load_checkpoint
from bgeserve.models.embedding_model import EmbeddingModel

TEXTS = [
    "hi",
    "What is BGE M3? A multilingual, multi-granularity embedding model.",
    "北京是中国的首都，也是一座历史悠久的城市。",
    "مرحبا بالعالم، هذا نص عربي قصير.",
    "emoji 🚀🔥 and    odd   spacing\tand tabs",
    "repeat repeat repeat repeat repeat repeat",
    "literal specials <s> <pad> </s> [PAD] [CLS] in text",
]


def _hidden_pair(path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ckpt = load_checkpoint(str(path))
    ids = ckpt.tokenizer.encode(TEXTS, max_length=ckpt.max_length).ids
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), ckpt.config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, seq in enumerate(ids):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    ours = EmbeddingModel(ckpt)
    theirs = AutoModel.from_pretrained(str(path)).eval()
    with torch.inference_mode():
        a = ours(input_ids, mask)
        b = theirs(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return a, b, mask.bool()


@pytest.mark.parametrize("fixture", ["m3_checkpoint", "minilm_path"])
def test_hidden_states_match_transformers(fixture, request):
    ours, theirs, mask = _hidden_pair(request.getfixturevalue(fixture))
    # Padding rows are undefined in both implementations; compare real tokens only.
    diff = (ours - theirs).abs()[mask].max().item()
    assert diff <= 1e-5, f"max abs diff {diff}"


def test_prefixed_weights_load_identically(m3_checkpoint, m3_checkpoint_prefixed):
    a, _, mask = _hidden_pair(m3_checkpoint)
    b = EmbeddingModel(load_checkpoint(str(m3_checkpoint_prefixed)))
    ckpt = load_checkpoint(str(m3_checkpoint_prefixed))
    ids = ckpt.tokenizer.encode(TEXTS[:1], max_length=64).ids
    with torch.inference_mode():
        hb = b(torch.tensor(ids), torch.ones(1, len(ids[0]), dtype=torch.long))
    assert torch.allclose(a[0, : len(ids[0])], hb[0], atol=1e-6)
