"""The official `openai` client, as its docs show, against bgeserve's `/v1/embeddings`."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from tests.api.conftest import API_KEY

from .conftest import TIMEOUT

TEXTS = ["What is BGE M3?", "Definition of BM25", "A longer sentence about dense and sparse retrieval " * 4]


@pytest.fixture
def client(minilm_keyed) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{minilm_keyed.url}/v1", api_key=API_KEY, timeout=TIMEOUT, max_retries=0)


def vectors(response) -> np.ndarray:
    return np.array([item.embedding for item in response.data])


def test_server_refuses_a_request_without_the_key(minilm_keyed):
    # So every passing test on this server shows the client sent `Authorization: Bearer <key>`.
    response = httpx.post(f"{minilm_keyed.url}/v1/embeddings", json={"input": "hi"}, timeout=TIMEOUT)
    assert response.status_code == 401


def test_default_call_is_base64_and_equals_embed(client, minilm_keyed):
    response = client.embeddings.create(model="text-embedding-3-small", input=TEXTS)
    assert [item.index for item in response.data] == [0, 1, 2]
    assert np.allclose(vectors(response), minilm_keyed.embed(TEXTS), atol=1e-6)


def test_float_equals_embed(client, minilm_keyed):
    response = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    assert np.allclose(vectors(response), minilm_keyed.embed(TEXTS), atol=1e-6)


def test_dimensions_equal_embed_dimensions(client, minilm_keyed):
    response = client.embeddings.create(model="minilm", input=TEXTS, dimensions=64)
    got = vectors(response)
    assert got.shape == (3, 64)
    assert np.allclose(got, minilm_keyed.embed(TEXTS, dimensions=64), atol=1e-6)


def test_token_ids_from_tokenize_equal_the_text(client, minilm_keyed):
    ids = [minilm_keyed.token_ids(text) for text in TEXTS]
    response = client.embeddings.create(model="minilm", input=ids)
    assert np.allclose(vectors(response), minilm_keyed.embed(TEXTS), atol=1e-6)


def test_unkeyed_bge_m3_server_accepts_any_key(m3):
    # Where the server has no key, the client's (required) api_key is ignored.
    client = openai.OpenAI(base_url=f"{m3.url}/v1", api_key="anything", timeout=TIMEOUT, max_retries=0)
    response = client.embeddings.create(model="bge-m3", input=TEXTS)
    assert np.allclose(vectors(response), m3.embed(TEXTS), atol=1e-6)
