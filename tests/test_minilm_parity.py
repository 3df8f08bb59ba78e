"""The bundled all-MiniLM-L6-v2 against sentence-transformers on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

from bgeserve import Embedder
from bgeserve.errors import ModelLacksOutput

TEXTS = [
    "A man is eating food.",
    "hello",
    "Retrieval-augmented generation grounds answers in documents. " * 40,  # > 256 tokens: truncated
    "北京是中国的首都",
    "emoji 🚀 test",
]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return Embedder(str(minilm_path), device="cpu", dtype="fp32")


def test_dense_matches_sentence_transformers(minilm, minilm_path):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_path), device="cpu").encode(TEXTS, batch_size=2)
    ours = minilm.encode(TEXTS, batch_size=3)["dense_vecs"]
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.99999
    assert np.abs(ours - reference).max() <= 1e-5


def test_default_embedder_is_bundled_minilm():
    assert Embedder(device="cpu").hidden_size == 384


def test_sparse_asked_of_minilm_is_a_typed_error(minilm):
    with pytest.raises(ModelLacksOutput, match="sparse_linear.pt"):
        minilm.encode(["x"], return_sparse=True)
    with pytest.raises(ModelLacksOutput, match="colbert_linear.pt|sparse_linear.pt"):
        minilm.compute_score([("a", "b")])


def test_bad_input_type_is_rejected(minilm):
    with pytest.raises(ValueError, match="string"):
        minilm.encode([1, 2])
