"""LangChain's embedding classes, as their docs show: `HuggingFaceEndpointEmbeddings` and `OpenAIEmbeddings`."""

from __future__ import annotations

import numpy as np
import openai
import pytest
from langchain_huggingface import HuggingFaceEndpointEmbeddings
from langchain_openai import OpenAIEmbeddings

from tests.api.conftest import API_KEY

from .conftest import TIMEOUT

DOCS = ["What is BGE M3?", "Definition of BM25", "BM25 is a bag-of-words retrieval function"]


def endpoint_embeddings(url: str, token: str | None = None) -> HuggingFaceEndpointEmbeddings:
    # The TEI integration page's call; langchain-huggingface 1.2.2+ refuses a URL here (pinned < 1.2.2).
    embeddings = HuggingFaceEndpointEmbeddings(model=url, huggingfacehub_api_token=token)
    embeddings.client.timeout = TIMEOUT  # the class takes no timeout; bound the test
    return embeddings


@pytest.mark.usefixtures("hub_online")
@pytest.mark.parametrize("name", ["minilm", "m3"])
def test_huggingface_endpoint_embeddings_equal_embed(name, request):
    server = request.getfixturevalue(name)
    embeddings = endpoint_embeddings(server.url)
    expected = server.embed([*DOCS, "How do I rank passages?"])
    assert np.allclose(embeddings.embed_documents(DOCS), expected[:3], atol=1e-6)
    assert np.allclose(embeddings.embed_query("How do I rank passages?"), expected[3], atol=1e-6)


@pytest.mark.usefixtures("hub_online")
def test_huggingface_endpoint_embeddings_send_the_token(minilm_keyed):
    embeddings = endpoint_embeddings(minilm_keyed.url, token=API_KEY)
    assert np.allclose(embeddings.embed_documents(DOCS), minilm_keyed.embed(DOCS), atol=1e-6)


def openai_embeddings(url: str, **options) -> OpenAIEmbeddings:
    return OpenAIEmbeddings(
        base_url=f"{url}/v1",
        api_key=API_KEY,
        model="text-embedding-3-small",
        timeout=TIMEOUT,
        max_retries=0,
        **options,
    )


def test_openai_embeddings_send_texts_when_told_not_to_tokenise(minilm_keyed):
    embeddings = openai_embeddings(minilm_keyed.url, check_embedding_ctx_length=False)
    expected = minilm_keyed.embed([*DOCS, "How do I rank passages?"])
    assert np.allclose(embeddings.embed_documents(DOCS), expected[:3], atol=1e-6)
    assert np.allclose(embeddings.embed_query("How do I rank passages?"), expected[3], atol=1e-6)


@pytest.mark.slow
def test_openai_embeddings_default_chunk_of_1000_texts(minilm_keyed):
    # 1100 texts: two requests, 1000 and 100 inputs (the client's default chunk_size).
    texts = [f"short text number {i}" for i in range(1100)]
    embeddings = openai_embeddings(minilm_keyed.url, check_embedding_ctx_length=False)
    got = np.array(embeddings.embed_documents(texts))
    assert got.shape == (1100, 384)
    assert np.allclose(got, minilm_keyed.embed(texts), atol=1e-6)


@pytest.mark.usefixtures("tiktoken_offline")
def test_openai_embeddings_default_tiktoken_ids_are_refused_with_the_fix(minilm_keyed):
    # By default the client sends cl100k ids ([[15339, 1917]] for "hello world"): valid MiniLM ids that
    # mean other words. The server must refuse them and name the option that makes the client send text.
    embeddings = openai_embeddings(minilm_keyed.url)
    with pytest.raises(openai.BadRequestError, match=r"check_embedding_ctx_length=False") as caught:
        embeddings.embed_documents(["hello world"])
    assert caught.value.status_code == 400
