"""LlamaIndex: the TEI embedding and rerank integrations, and `OpenAIEmbedding` pointed at bgeserve."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference
from llama_index.postprocessor.tei_rerank import TextEmbeddingInference as TextEmbeddingInferenceRerank

from tests.api.conftest import API_KEY

from .conftest import TIMEOUT

DOCS = [
    "BM25 is a bag-of-words retrieval function",
    "BGE M3 gives dense, sparse and multi-vector outputs",
    "A cat sat on the mat",
    "Paris is the capital of France",
]
QUERY = "What is BGE M3?"


@pytest.mark.parametrize("name", ["minilm", "m3"])
def test_tei_embedding_equals_embed(name, request):
    server = request.getfixturevalue(name)
    # The client posts {"inputs": [...], "truncate": true} to /embed.
    model = TextEmbeddingsInference(base_url=server.url, model_name="BAAI/bge-m3", timeout=TIMEOUT)
    expected = server.embed([QUERY, *DOCS])
    assert np.allclose(model.get_text_embedding(QUERY), expected[0], atol=1e-6)
    assert np.allclose(model.get_query_embedding(QUERY), expected[0], atol=1e-6)
    assert np.allclose(model.get_text_embedding_batch(DOCS), expected[1:], atol=1e-6)


def test_tei_embedding_sends_the_key(minilm_keyed):
    model = TextEmbeddingsInference(
        base_url=minilm_keyed.url, model_name="minilm", timeout=TIMEOUT, auth_token=API_KEY
    )
    assert np.allclose(model.get_text_embedding_batch(DOCS), minilm_keyed.embed(DOCS), atol=1e-6)


def rerank(url: str, **options) -> list[NodeWithScore]:
    reranker = TextEmbeddingInferenceRerank(base_url=url, top_n=len(DOCS), timeout=TIMEOUT, **options)
    nodes = [NodeWithScore(node=TextNode(text=text), score=0.0) for text in DOCS]
    return reranker.postprocess_nodes(nodes, QueryBundle(QUERY))


@pytest.mark.parametrize("name", ["minilm", "m3"])
def test_tei_rerank_orders_as_the_server(name, request):
    server = request.getfixturevalue(name)
    ranked = rerank(server.url)
    expected = server.post("/rerank", {"query": QUERY, "texts": DOCS}).json()
    assert [node.text for node in ranked] == [DOCS[rank["index"]] for rank in expected]
    assert np.allclose([node.score for node in ranked], [rank["score"] for rank in expected], atol=1e-6)


def test_tei_rerank_sends_the_key_as_given(minilm_keyed):
    # This postprocessor puts auth_token in the Authorization header verbatim: "Bearer " is the user's.
    ranked = rerank(minilm_keyed.url, auth_token=f"Bearer {API_KEY}")
    expected = minilm_keyed.post("/rerank", {"query": QUERY, "texts": DOCS}).json()
    assert [node.text for node in ranked] == [DOCS[rank["index"]] for rank in expected]
    refused = httpx.post(f"{minilm_keyed.url}/rerank", json={"query": QUERY, "texts": DOCS}, timeout=TIMEOUT)
    assert refused.status_code == 401


def test_openai_embedding_default_batch_of_100(minilm_keyed):
    # 150 texts: two /v1/embeddings requests of 100 and 50 inputs (embed_batch_size's default).
    texts = [f"passage number {i} about retrieval" for i in range(150)]
    model = OpenAIEmbedding(
        api_base=f"{minilm_keyed.url}/v1",
        api_key=API_KEY,
        model_name="text-embedding-3-small",
        timeout=TIMEOUT,
        max_retries=0,
    )
    got = np.array(model.get_text_embedding_batch(texts))
    assert got.shape == (150, 384)
    assert np.allclose(got, minilm_keyed.embed(texts), atol=1e-6)
    assert np.allclose(model.get_query_embedding(QUERY), minilm_keyed.embed([QUERY])[0], atol=1e-6)
