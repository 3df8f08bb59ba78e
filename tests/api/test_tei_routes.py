"""TEI-shaped requests on every TEI route, against the tiny bge-m3 (and MiniLM where it differs)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from .conftest import API_KEY

# TEI's timing headers, whole milliseconds; x-compute-time is the whole request.
PARTS = ("x-tokenization-time", "x-queue-time", "x-inference-time")


@pytest.fixture(scope="module")
def http(m3_server) -> httpx.Client:
    with httpx.Client(base_url=m3_server.url, timeout=60) as client:
        yield client


def _int_header(response: httpx.Response, name: str) -> int:
    return int(response.headers[name])


def test_embed_single_and_batch(http, m3_embedder):
    one = http.post("/embed", json={"inputs": "What is BGE M3?"})
    assert one.status_code == 200
    many = http.post("/embed", json={"inputs": ["What is BGE M3?", "Definition of BM25"]}).json()
    expected = m3_embedder.encode(["What is BGE M3?", "Definition of BM25"])["dense_vecs"]
    assert len(one.json()) == 1
    np.testing.assert_allclose(one.json()[0], expected[0], atol=1e-5)
    np.testing.assert_allclose(many, expected, atol=1e-5)


def test_compute_headers_count_the_request_and_its_time_parts(http, m3_embedder):
    texts = ["What is BGE M3?", "北京是中国的首都 🙂", "word " * 600]  # the last is cut to 512 tokens
    for inputs in (texts[:1], texts[1:2], texts):
        response = http.post("/embed", json={"inputs": inputs})
        assert response.status_code == 200, response.text
        # Characters are code points, as TEI counts them (not UTF-8 bytes); tokens are those embedded,
        # special tokens included and a cut text counted as cut.
        assert _int_header(response, "x-compute-characters") == sum(len(t) for t in inputs)
        whole = [m3_embedder.tokenizer.token_count(t) for t in inputs]
        assert _int_header(response, "x-compute-tokens") == sum(min(512, n) for n in whole)
        assert _int_header(response, "x-truncated-inputs") == sum(n > 512 for n in whole)
        total = _int_header(response, "x-compute-time")
        assert all(0 <= _int_header(response, part) <= total for part in PARTS)
        if len(inputs) == 1:
            # One input goes through the three stages one after another, inside the request's time.
            assert sum(_int_header(response, part) for part in PARTS) <= total
    assert len(texts[1]) < len(texts[1].encode())


def test_timing_headers_are_the_engines_timings_in_whole_milliseconds():
    from bgeserve.api.outputs import timing_headers
    from bgeserve.engine.engine import EncodeResult, Timings

    timings = Timings(tokenization=0.0129, queue=0.25, inference=1.5004, total=1.9375)
    result = EncodeResult(outputs=[], prompt_tokens=17, truncated=1, characters=40, timings=timings)
    # Cut to whole milliseconds, as TEI's as_millis() does: 12.9 ms -> 12.
    assert timing_headers(result) == {
        "x-compute-time": "1937", "x-tokenization-time": "12", "x-queue-time": "250", "x-inference-time": "1500",
        "x-compute-tokens": "17", "x-compute-characters": "40", "x-truncated-inputs": "1",
    }


def test_embed_normalize_false_and_dimensions(http):
    raw = np.array(http.post("/embed", json={"inputs": "hello", "normalize": False}).json()[0])
    unit = np.array(http.post("/embed", json={"inputs": "hello"}).json()[0])
    np.testing.assert_allclose(raw / np.linalg.norm(raw), unit, atol=1e-5)
    cut = np.array(http.post("/embed", json={"inputs": "hello", "dimensions": 8}).json()[0])
    assert cut.shape == (8,) and np.linalg.norm(cut) == pytest.approx(1.0, abs=1e-5)


def test_truncation_is_reported_and_direction_matters(http, m3_embedder):
    long = "word " * 600  # tiny bge-m3 takes 512 tokens
    text = "left start " + long + "right end"
    body = m3_embedder.tokenizer._tok.encode(text, add_special_tokens=False).ids  # whole, uncut
    right = http.post("/embed", json={"inputs": [text, "short"]})
    assert right.headers["x-truncated-inputs"] == "1"
    left = http.post("/embed", json={"inputs": [text], "truncation_direction": "Left"})
    assert left.status_code == 200 and left.headers["x-truncated-inputs"] == "1"
    # Each embeds exactly its kept tokens: the first 510 of the body (right) or the last 510 (left).
    head, tail = [0, *body[:510], 2], [0, *body[-510:], 2]
    np.testing.assert_allclose(right.json()[0], http.post("/embed", json={"inputs": [head]}).json()[0], atol=1e-5)
    np.testing.assert_allclose(left.json()[0], http.post("/embed", json={"inputs": [tail]}).json()[0], atol=1e-5)
    assert not np.allclose(left.json()[0], right.json()[0], atol=1e-3)
    kept = http.post("/tokenize", json={"inputs": text, "truncation_direction": "Left"}).json()[0]
    assert [t["id"] for t in kept] == tail
    assert text[kept[1]["start"]:kept[-2]["stop"]].endswith("word right end")  # the text's last words survive
    refused = http.post("/embed", json={"inputs": long, "truncate": False})
    assert refused.status_code == 422
    assert "512" in refused.json()["error"] and refused.json()["error_type"] == "Validation"


def test_embed_sparse_matches_lexical_weights_sorted_by_index(http, m3_embedder):
    got = http.post("/embed_sparse", json={"inputs": ["sparse retrieval with BM25"]}).json()[0]
    expected = m3_embedder.encode("sparse retrieval with BM25", return_dense=False, return_sparse=True)
    weights = expected["lexical_weights"]
    assert [item["index"] for item in got] == sorted(int(k) for k in weights)
    for item in got:
        assert item["value"] == pytest.approx(weights[str(item["index"])], abs=1e-5)


def test_embed_all_gives_one_vector_per_token(http, m3_embedder):
    got = http.post("/embed_all", json={"inputs": ["two words", "three words here"]}).json()
    for text, per_token in zip(["two words", "three words here"], got, strict=True):
        assert len(per_token) == m3_embedder.tokenizer.token_count(text)
        assert len(per_token[0]) == 32


def test_rerank_uses_hybrid_score_sorted_descending(http, m3_embedder):
    texts = ["BM25 is a bag-of-words ranking function", "The cat sat on the mat", "Paris is in France"]
    query = "What is BM25?"
    ranks = http.post("/rerank", json={"query": query, "texts": texts, "return_text": True}).json()
    assert [r["score"] for r in ranks] == sorted((r["score"] for r in ranks), reverse=True)
    assert sorted(r["index"] for r in ranks) == [0, 1, 2]
    assert all(r["text"] == texts[r["index"]] for r in ranks)
    expected = m3_embedder.compute_score(
        [[query, t] for t in texts], weights_for_different_modes=[0.4, 0.2, 0.4]
    )["colbert+sparse+dense"]
    for r in ranks:
        assert r["score"] == pytest.approx(expected[r["index"]], abs=1e-4)
    dense_only = http.post(
        "/rerank", json={"query": query, "texts": texts, "weights_for_different_modes": [1, 0, 0]}
    ).json()
    # Weights [dense, sparse, colbert] = [1, 0, 0]: the score is the cosine of the /embed vectors alone.
    _assert_ranked_by_cosine(dense_only, http.post("/embed", json={"inputs": [query, *texts]}).json())
    assert all(set(r) == {"index", "score"} for r in dense_only)  # no text unless return_text


def _assert_ranked_by_cosine(ranks: list[dict], vectors: list[list[float]]) -> None:
    """`ranks` (of /rerank) score each text by its cosine with the query, vectors[0], best first."""
    cosine = np.array(vectors[1:]) @ np.array(vectors[0])
    assert [r["index"] for r in ranks] == sorted(range(len(cosine)), key=lambda i: -cosine[i])
    np.testing.assert_allclose([r["score"] for r in ranks], [cosine[r["index"]] for r in ranks], atol=1e-5)
    assert len(set(np.round(cosine, 3))) == len(cosine)  # distinct scores: the order above is the only one


def test_tokenize_and_decode_round_trip(http):
    tokens = http.post("/tokenize", json={"inputs": "Hello world"}).json()
    assert len(tokens) == 1
    first, *_, last = tokens[0]
    assert first["special"] and last["special"] and first["start"] is None
    words = [t for t in tokens[0] if not t["special"]]
    assert "".join("Hello world"[t["start"] : t["stop"]] for t in words).replace(" ", "") == "Helloworld"
    bare = http.post("/tokenize", json={"inputs": ["Hello world"], "add_special_tokens": False}).json()
    assert not any(t["special"] for t in bare[0])
    ids = [t["id"] for t in tokens[0]]
    assert http.post("/decode", json={"ids": ids}).json() == ["Hello world"]
    both = http.post("/decode", json={"ids": [ids, ids], "skip_special_tokens": False}).json()
    assert len(both) == 2 and both[0].startswith("<s>")


def test_info_health_and_docs(http):
    info = http.get("/info").json()
    assert info["max_input_length"] == 512
    assert info["max_client_batch_size"] == 32
    assert info["outputs"] == {"dense": True, "sparse": True, "colbert": True}
    assert info["devices"] == ["cpu/0", "cpu/1"]
    assert info["model_dtype"] == "float32"
    assert info["max_batch_tokens"] == 2048  # the CPU default: no --max-batch-tokens given
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/docs").status_code == 200
    assert "/encode" in http.get("/openapi.json").json()["paths"]


def test_minilm_lacks_sparse_but_reranks_dense_only(minilm_server, minilm_embedder):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    sparse = httpx.post(f"{minilm_server.url}/embed_sparse", json={"inputs": "x"}, headers=auth)
    assert sparse.status_code == 424  # TEI's status for a route the model type cannot serve
    assert sparse.json()["error_type"] == "Backend" and "sparse_linear.pt" in sparse.json()["error"]
    query, texts = "capital of France", ["Bananas are yellow", "Paris is the capital of France", "France is big"]
    ranks = httpx.post(f"{minilm_server.url}/rerank", json={"query": query, "texts": texts}, headers=auth).json()
    vectors = httpx.post(f"{minilm_server.url}/embed", json={"inputs": [query, *texts]}, headers=auth).json()
    _assert_ranked_by_cosine(ranks, vectors)
    assert ranks[0]["index"] == 1  # the sentence about the capital first
    # The /embed vectors are the model's own: the same as the in-process embedder gives.
    np.testing.assert_allclose(vectors, minilm_embedder.encode([query, *texts])["dense_vecs"], atol=1e-5)


def test_root_and_invocations_embed_like_embed(http):
    # huggingface_hub's InferenceClient(model=URL).feature_extraction posts to the root, as TEI routes it.
    body = {"inputs": ["What is BGE M3?", "Definition of BM25"], "normalize": True}
    expected = http.post("/embed", json=body).json()
    for path in ("/", "/invocations"):
        response = http.post(path, json=body)
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(response.json(), expected)
        assert "x-compute-time" in response.headers
    assert http.post("/", json={"inputs": []}).status_code == 400
    assert http.post("/", json={"inputs": 5}).json()["error_type"] == "Validation"
    broken = http.post("/", content=b'{"inputs": ', headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]
    # huggingface_hub's sentence_similarity posts here too, with `inputs` an object.
    pair = {"inputs": {"source_sentence": "What is BM25?", "sentences": ["BM25 ranks", "What is BM25?"]},
            "parameters": {}}
    for path in ("/", "/invocations"):
        assert http.post(path, json=pair).json() == http.post("/similarity", json=pair).json()
    for path in ("/", "/ping"):
        assert http.get(path).json() == {"status": "ok"}
    assert http.head("/health").status_code == 200


def test_similarity_is_the_cosine_of_the_embed_vectors(http):
    source, others = "What is BM25?", ["BM25 ranks documents", "A cat sat on the mat", "What is BM25?"]
    response = http.post(
        "/similarity", json={"inputs": {"source_sentence": source, "sentences": others}, "parameters": None}
    )
    assert response.status_code == 200, response.text
    vectors = np.array(http.post("/embed", json={"inputs": [source, *others]}).json())
    np.testing.assert_allclose(response.json(), vectors[1:] @ vectors[0], atol=1e-5)
    assert response.json()[2] == pytest.approx(1.0, abs=1e-5)
    with_parameters = http.post(
        "/similarity",
        json={"inputs": {"source_sentence": source, "sentences": others},
              "parameters": {"truncate": True, "truncation_direction": "Left"}},
    )
    np.testing.assert_allclose(with_parameters.json(), response.json(), atol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "error_type", "words"),
    [
        ({"inputs": {"source_sentence": "a", "sentences": []}}, 400, "Empty", "inputs.sentences"),
        ({"inputs": {"source_sentence": "a", "sentences": ["b"] * 32}}, 422, "Validation", "33 inputs"),
        ({"inputs": {"source_sentence": "a"}}, 422, "Validation", "sentences"),
        ({"inputs": "a"}, 422, "Validation", "inputs"),
        ({"inputs": {"source_sentence": "a", "sentences": ["b"]}, "parameters": {"prompt_name": "q"}}, 422,
         "Validation", "prompt_name"),
    ],
)
def test_similarity_errors_have_tei_codes(http, body, status, error_type, words):
    response = http.post("/similarity", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type
    assert words in response.json()["error"]


def test_embed_sparse_as_indices_and_values(http):
    texts = ["BM25 is a bag-of-words retrieval function", "What is BGE M3?"]
    tei = http.post("/embed_sparse", json={"inputs": texts}).json()
    vectors = http.post("/embed_sparse", json={"inputs": texts, "sparse_format": "indices_values"}).json()
    assert len(vectors) == 2
    for pairs, vector in zip(tei, vectors, strict=True):
        assert set(vector) == {"indices", "values"}
        assert vector["indices"] == [p["index"] for p in pairs] == sorted(vector["indices"])
        assert vector["values"] == [p["value"] for p in pairs]
        assert len(vector["indices"]) > 0
    bad = http.post("/embed_sparse", json={"inputs": texts, "sparse_format": "qdrant"})
    assert bad.status_code == 422 and bad.json()["error_type"] == "Validation"
