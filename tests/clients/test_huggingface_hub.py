"""`huggingface_hub.InferenceClient(model=URL)`: feature extraction and sentence similarity on bgeserve."""

from __future__ import annotations

import numpy as np
import pytest
from huggingface_hub import InferenceClient

from tests.api.conftest import API_KEY

from .conftest import TIMEOUT

pytestmark = pytest.mark.usefixtures("hub_online")


@pytest.mark.parametrize("name", ["minilm", "m3"])
def test_feature_extraction_equals_embed(name, request):
    server = request.getfixturevalue(name)
    client = InferenceClient(model=server.url, timeout=TIMEOUT)
    # The client sends {"inputs": text} to POST / (the model's task); the answer has /embed's shape.
    got = client.feature_extraction("What is BGE M3?")
    expected = server.embed(["What is BGE M3?"])
    assert got.shape == expected.shape
    assert np.allclose(got, expected, atol=1e-6)


def test_feature_extraction_sends_the_key(minilm_keyed):
    client = InferenceClient(model=minilm_keyed.url, api_key=API_KEY, timeout=TIMEOUT)
    got = client.feature_extraction("hello there", normalize=True, truncate=True, truncation_direction="right")
    assert np.allclose(got, minilm_keyed.embed(["hello there"]), atol=1e-6)


@pytest.mark.parametrize("name", ["minilm", "m3"])
def test_sentence_similarity_is_cosine_of_embed(name, request):
    server = request.getfixturevalue(name)
    client = InferenceClient(model=server.url, timeout=TIMEOUT)
    others = ["BM25 ranks documents by term frequency", "A cat sat on the mat", "What is BGE M3?"]
    # The client posts {"inputs": {"source_sentence", "sentences"}, "parameters": {}} to POST /.
    got = client.sentence_similarity("What is BGE M3?", other_sentences=others)
    source, *rest = server.embed(["What is BGE M3?", *others])
    assert np.allclose(got, np.array(rest) @ source, atol=1e-6)
    assert got[-1] == pytest.approx(1.0, abs=1e-6)
