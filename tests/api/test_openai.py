"""The official `openai` client against a real server: float and base64, dimensions, ids, auth."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from .conftest import API_KEY

TEXTS = ["What is BGE M3?", "Definition of BM25", "A much longer sentence about retrieval " * 5]


@pytest.fixture(scope="module")
def client(minilm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{minilm_server.url}/v1", api_key=API_KEY, max_retries=0)


def test_default_client_call_base64_matches_in_process_model(client, minilm_embedder):
    # The client asks for base64 by default and decodes it itself.
    response = client.embeddings.create(model="minilm", input=TEXTS)
    got = np.array([item.embedding for item in response.data])
    expected = minilm_embedder.encode(TEXTS)["dense_vecs"]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [item.index for item in response.data] == [0, 1, 2]
    assert response.model == "minilm"
    tokens = sum(minilm_embedder.tokenizer.token_count(t) for t in TEXTS)
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens


def test_float_and_base64_give_the_same_numbers(client, minilm_server):
    floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    raw = httpx.post(
        f"{minilm_server.url}/v1/embeddings",
        json={"model": "minilm", "input": TEXTS, "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()
    for as_float, as_b64 in zip(floats.data, raw["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(as_b64["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(as_float.embedding, dtype=np.float32))
        assert decoded.shape == (384,)


def test_dimensions_truncate_and_renormalise(client):
    full = client.embeddings.create(model="minilm", input="hello there", encoding_format="float")
    cut = client.embeddings.create(model="minilm", input="hello there", dimensions=64, encoding_format="float")
    vec = np.array(cut.data[0].embedding)
    assert vec.shape == (64,)
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    prefix = np.array(full.data[0].embedding[:64])
    np.testing.assert_allclose(vec, prefix / np.linalg.norm(prefix), atol=1e-6)


def test_token_id_input_equals_text_input(client, minilm_embedder):
    ids = minilm_embedder.tokenizer.encode(["hello there"], 256).ids[0]
    by_ids = client.embeddings.create(model="minilm", input=[ids], encoding_format="float")
    by_single_ids = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    by_text = client.embeddings.create(model="minilm", input="hello there", encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, by_text.data[0].embedding, atol=1e-6)
    assert len(by_single_ids.data) == 1
    assert by_ids.usage.prompt_tokens == len(ids)


def test_other_model_name_is_accepted(client):
    response = client.embeddings.create(model="text-embedding-3-small", input="x", encoding_format="float")
    assert response.model == "minilm"


def test_wrong_or_missing_api_key_is_401_and_health_stays_open(minilm_server):
    bad = openai.OpenAI(base_url=f"{minilm_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.embeddings.create(model="minilm", input="x")
    assert info.value.status_code == 401
    body = httpx.post(f"{minilm_server.url}/embed", json={"inputs": "x"}).json()
    assert body["error_type"] == "Unauthorized"
    assert httpx.get(f"{minilm_server.url}/health").status_code == 200


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["minilm"]


def test_client_errors_surface_as_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="minilm", input="x", dimensions=10_000)
    assert "384" in info.value.message
    assert info.value.body["param"] == "dimensions"


def test_a_batch_of_2048_inputs_works_with_default_settings(client, minilm_server):
    texts = [f"passage number {i} about embeddings" for i in range(2048)]
    response = client.embeddings.create(model="minilm", input=texts, encoding_format="float", timeout=300)
    assert [item.index for item in response.data] == list(range(2048))
    expected = httpx.post(
        f"{minilm_server.url}/embed", json={"inputs": [texts[0], texts[2047]]},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()
    np.testing.assert_allclose(response.data[0].embedding, expected[0], atol=1e-6)
    np.testing.assert_allclose(response.data[2047].embedding, expected[1], atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="--max-openai-batch-size"):
        client.embeddings.create(model="minilm", input=[*texts, "one too many"])


def test_token_ids_of_another_tokenizer_get_a_400_that_names_the_fix(client):
    # tiktoken's cl100k ids for "hello world", as langchain-openai sends them by default.
    with pytest.raises(openai.BadRequestError, match="check_embedding_ctx_length=False") as caught:
        client.embeddings.create(model="minilm", input=[[15339, 1917]])
    assert caught.value.body["code"] == "invalid_input"
