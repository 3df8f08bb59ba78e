"""Native bge-m3 routes: /encode returns FlagEmbedding's keys from one pass, /score its five lists."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from .conftest import API_KEY

TEXTS = ["What is BGE M3?", "BM25 is a bag-of-words retrieval function", "日本語のテキストも扱える"]


@pytest.fixture(scope="module")
def http(m3_server) -> httpx.Client:
    with httpx.Client(base_url=m3_server.url, timeout=60) as client:
        yield client


def test_encode_all_three_outputs_match_flagembedding_keys(http, m3_embedder):
    body = {"input": TEXTS, "return_dense": True, "return_sparse": True, "return_colbert_vecs": True}
    response = http.post("/encode", json=body)
    assert response.status_code == 200
    got = response.json()
    expected = m3_embedder.encode(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert [item["index"] for item in got["data"]] == [0, 1, 2]
    for i, item in enumerate(got["data"]):
        np.testing.assert_allclose(item["dense_vecs"], expected["dense_vecs"][i], atol=1e-5)
        assert item["lexical_weights"].keys() == expected["lexical_weights"][i].keys()
        for token, weight in item["lexical_weights"].items():
            assert weight == pytest.approx(expected["lexical_weights"][i][token], abs=1e-5)
        np.testing.assert_allclose(item["colbert_vecs"], expected["colbert_vecs"][i], atol=1e-5)
    assert got["usage"]["prompt_tokens"] == sum(m3_embedder.tokenizer.token_count(t) for t in TEXTS)
    assert int(response.headers["x-compute-tokens"]) == got["usage"]["prompt_tokens"]


def test_encode_defaults_to_dense_only_and_base64_decodes(http):
    plain = http.post("/encode", json={"input": "hello"}).json()["data"][0]
    assert set(plain) == {"index", "dense_vecs"}
    packed = http.post(
        "/encode",
        json={"input": "hello", "return_colbert_vecs": True, "encoding_format": "base64"},
    ).json()["data"][0]
    dense = np.frombuffer(base64.b64decode(packed["dense_vecs"]), dtype="<f4")
    np.testing.assert_array_equal(dense, np.array(plain["dense_vecs"], dtype=np.float32))
    colbert = np.frombuffer(base64.b64decode(packed["colbert_vecs"]), dtype="<f4").reshape(-1, 32)
    assert colbert.shape[0] >= 2


def test_encode_max_length(http):
    short = http.post("/encode", json={"input": "word " * 50, "max_length": 8}).json()
    assert short["usage"]["prompt_tokens"] == 8
    over = http.post("/encode", json={"input": "x", "max_length": 100_000})
    assert over.status_code == 400 and "512" in over.json()["error"]["message"]


def test_score_returns_compute_score_lists(http, m3_embedder):
    pairs = [["What is BM25?", TEXTS[1]], ["What is BM25?", "The cat sat on the mat"], [TEXTS[0], TEXTS[0]]]
    got = http.post("/score", json={"pairs": pairs}).json()
    expected = m3_embedder.compute_score(pairs)
    assert set(got) == {"dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"}
    for key, values in expected.items():
        np.testing.assert_allclose(got[key], values, atol=1e-4)
    weighted = http.post("/score", json={"pairs": pairs, "weights_for_different_modes": [0.6, 0.3, 0.1]}).json()
    expected_w = m3_embedder.compute_score(pairs, weights_for_different_modes=[0.6, 0.3, 0.1])
    np.testing.assert_allclose(weighted["colbert+sparse+dense"], expected_w["colbert+sparse+dense"], atol=1e-4)
    # FlagEmbedding's formulas: weights are (dense, sparse, colbert), each mean over its own weights.
    dense, sparse, colbert = (np.array(weighted[k]) for k in ("dense", "sparse", "colbert"))
    np.testing.assert_allclose(weighted["sparse+dense"], (0.6 * dense + 0.3 * sparse) / 0.9, atol=1e-6)
    np.testing.assert_allclose(weighted["colbert+sparse+dense"], 0.6 * dense + 0.3 * sparse + 0.1 * colbert,
                               atol=1e-6)


def test_outputs_the_model_lacks_are_4xx(minilm_server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for path, body in [
        ("/encode", {"input": "x", "return_colbert_vecs": True}),
        ("/score", {"pairs": [["a", "b"]]}),
    ]:
        response = httpx.post(f"{minilm_server.url}{path}", json=body, headers=auth)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "model_lacks_output"
        assert "MiniLM" in response.json()["error"]["message"]


def test_encode_sparse_as_indices_and_values_with_dense_in_one_call(http):
    body = {"input": TEXTS, "return_dense": True, "return_sparse": True}
    plain = http.post("/encode", json=body).json()["data"]
    paired = http.post("/encode", json={**body, "sparse_format": "indices_values"}).json()["data"]
    for a, b in zip(plain, paired, strict=True):
        assert b["dense_vecs"] == a["dense_vecs"]
        weights = {int(k): v for k, v in a["lexical_weights"].items()}
        assert b["lexical_weights"]["indices"] == sorted(weights)
        assert b["lexical_weights"]["values"] == [weights[i] for i in sorted(weights)]
    bad = http.post("/encode", json={**body, "sparse_format": "tei"})
    assert bad.status_code == 400 and "sparse_format" in bad.json()["error"]["message"]
