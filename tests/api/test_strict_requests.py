"""Requests are taken as typed, undecodable bodies are named for what they are, hybrid scores stay finite,
`truncate` works on the OpenAI route, and /openapi.json says all of it. Against the real tiny bge-m3 server."""

from __future__ import annotations

import math

import httpx
import pytest

from .conftest import API_KEY

LONG = "word " * 600  # over the tiny bge-m3's 512 tokens


@pytest.fixture(scope="module")
def http(m3_server) -> httpx.Client:
    with httpx.Client(base_url=m3_server.url, timeout=60) as client:
        yield client


def _message(response: httpx.Response) -> str:
    body = response.json()
    return body["error"]["message"] if isinstance(body["error"], dict) else body["error"]


# -- 12. strict types ------------------------------------------------------------------------------------

WRONG_TYPES = [
    ("/embed", {"inputs": "x", "dimensions": True}, 422, "dimensions"),
    ("/embed", {"inputs": "x", "dimensions": "16"}, 422, "dimensions"),
    ("/embed", {"inputs": "x", "normalize": "yes"}, 422, "normalize"),
    ("/embed", {"inputs": "x", "truncate": 0}, 422, "truncate"),
    ("/v1/embeddings", {"input": "x", "dimensions": True}, 400, "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": 16.5}, 400, "dimensions"),
    ("/v1/embeddings", {"input": [0, 5.5, 2]}, 400, "input"),
    ("/v1/embeddings", {"input": "x", "truncate": "false"}, 400, "truncate"),
    ("/encode", {"input": "x", "return_sparse": 1}, 400, "return_sparse"),
    ("/score", {"pairs": [["a", "b"]], "max_length": "64"}, 400, "max_length"),
    ("/tokenize", {"inputs": "x", "add_special_tokens": "no"}, 422, "add_special_tokens"),
    ("/decode", {"ids": [0, True, 2]}, 422, "ids"),
    ("/rerank", {"query": "q", "texts": ["a"], "return_text": "true"}, 422, "return_text"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}, "parameters": {"truncate": "yes"}},
     422, "truncate"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "field"), WRONG_TYPES, ids=[f"{c[0]}-{i}" for i, c in enumerate(WRONG_TYPES)]
)
def test_a_value_of_the_wrong_type_is_refused_not_converted(http, path, body, status, field):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert field in _message(response)


def test_values_of_the_right_type_still_work(http):
    assert len(http.post("/embed", json={"inputs": "x", "dimensions": 16}).json()[0]) == 16
    # JSON has one number type: an integral 16.0 is the integer 16, as JSON Schema's "integer" says.
    assert len(http.post("/embed", json={"inputs": "x", "dimensions": 16.0}).json()[0]) == 16
    as_floats = http.post("/v1/embeddings", json={"input": [0.0, 35.0, 2.0]}).json()["data"][0]["embedding"]
    as_ints = http.post("/v1/embeddings", json={"input": [0, 35, 2]}).json()["data"][0]["embedding"]
    assert as_floats == as_ints
    scores = http.post("/score", json={"pairs": [["a", "b"]], "weights_for_different_modes": [1, 2, 3]})
    assert scores.status_code == 200  # integers are fine where numbers are asked for


# -- 11. hybrid weights at the edges of float64 ------------------------------------------------------------


@pytest.mark.parametrize("weights", [[1e308, 1e308, 1e308], [5e-324, 5e-324, 5e-324], [1e300, 1e300, 1e300]])
def test_extreme_hybrid_weights_give_the_same_finite_scores_as_their_ratio(http, weights):
    pairs = [["what is bm25", "bm25 ranks documents"], ["what is bm25", "a cat"], ["hi", "hello there"]]
    plain = http.post("/score", json={"pairs": pairs, "weights_for_different_modes": [1, 1, 1]}).json()
    extreme = http.post("/score", json={"pairs": pairs, "weights_for_different_modes": weights})
    assert extreme.status_code == 200, extreme.text
    for key, values in extreme.json().items():
        assert all(math.isfinite(v) for v in values), key
        assert values == pytest.approx(plain[key], rel=1e-9, abs=1e-12), key
    rerank = {"query": "what is bm25", "texts": ["bm25 ranks documents", "a cat", "what bm25 is"]}
    ranked = http.post("/rerank", json={**rerank, "weights_for_different_modes": weights})
    reference = http.post("/rerank", json={**rerank, "weights_for_different_modes": [1, 1, 1]})
    assert [r["index"] for r in ranked.json()] == [r["index"] for r in reference.json()]


def test_each_weighted_mean_is_scaled_by_its_own_weights(http):
    # dense 0, sparse the smallest double, colbert 1e305: sparse+dense is sparse, the mean of all is colbert.
    pairs = [["what is bm25", "bm25 ranks documents"], ["hi", "hello there"]]
    scores = http.post("/score", json={"pairs": pairs, "weights_for_different_modes": [0, 5e-324, 6.5e305]})
    assert scores.status_code == 200, scores.text
    body = scores.json()
    assert body["sparse+dense"] == pytest.approx(body["sparse"], rel=1e-12)
    assert body["colbert+sparse+dense"] == pytest.approx(body["colbert"], rel=1e-12)


def test_weights_without_a_defined_mean_are_refused_before_any_work(http):
    response = http.post("/rerank", json={"query": "q", "texts": ["a"], "weights_for_different_modes": [0, 0, 5]})
    assert response.status_code == 422 and "sum to zero" in response.json()["error"]


# -- 13. undecodable bodies, codes, truncate on the OpenAI route ----------------------------------------------

DEEP = b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HUGE_INT = b'{"input": [0, ' + b"7" * 5000 + b", 2]}"
BODIES = [
    (b'{"input": "caf\xe9"}', "not valid UTF-8 (byte 0xe9 at position"),
    ('{"input": "café" oops}'.encode(), "not valid JSON"),
    (DEEP, "nests arrays or objects too deeply"),
    (HUGE_INT, "integer too long"),
]


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embed", "/"])
@pytest.mark.parametrize(("raw", "words"), BODIES, ids=["utf8", "json", "deep", "huge-int"])
def test_an_undecodable_body_is_named_for_what_is_wrong(http, path, raw, words):
    raw = raw.replace(b'"input"', b'"inputs"') if path != "/v1/embeddings" else raw
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    message = _message(response)
    assert words in message, message
    if "UTF-8" in words:
        assert f"position {raw.index(0xE9)})" in message
    if words == "not valid JSON":
        assert "UTF-8" not in message  # the old one message for everything
    if path == "/v1/embeddings":
        assert response.json()["error"]["code"] == "invalid_json"
    else:
        assert response.json()["error_type"] == "Validation"


def test_the_openai_family_never_answers_a_null_code(http):
    for response in (http.post("/v1/nope", json={}), http.get("/v1/embeddings"), http.get("/encode")):
        assert response.status_code in (404, 405)
        assert isinstance(response.json()["error"]["code"], str)


def test_truncate_is_honoured_on_the_openai_route(http):
    refused = http.post("/v1/embeddings", json={"input": LONG, "truncate": False})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert "truncate=true" in refused.json()["error"]["message"]
    cut = http.post("/v1/embeddings", json={"input": LONG, "truncate": True})
    assert cut.status_code == 200 and cut.headers["x-truncated-inputs"] == "1"
    assert http.post("/v1/embeddings", json={"input": LONG}).status_code == 200  # --auto-truncate


# -- 14. the OpenAPI document ----------------------------------------------------------------------------


def test_openapi_documents_every_error_in_its_familys_shape(http):
    doc = http.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            if "requestBody" not in operation:
                continue
            openai = path.startswith(("/v1/", "/encode", "/score"))
            expected = {"400", "408", "413", "429", "503", "504"} | ({"500"} if openai else {"422", "424"})
            assert expected <= codes, (method, path, codes)
            assert ("422" in codes) is not openai, (method, path)
            ref = operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("OpenAIError" if openai else "TEIError"), (path, ref)
            assert "security" not in operation  # this server has no key
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def test_openapi_schemas_say_what_the_server_refuses(http):
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    inputs = schemas["EmbedRequest"]["properties"]["inputs"]["anyOf"]
    text, texts, ids, id_lists = inputs
    assert text == {"type": "string", "minLength": 1}
    assert texts["minItems"] == 1 and texts["maxItems"] == 32 and texts["items"]["minLength"] == 1
    assert ids["minItems"] == 1 and ids["items"]["maximum"] == 2001  # the tiny tokenizer's last id
    assert schemas["OpenAIEmbeddingRequest"]["properties"]["input"]["anyOf"][1]["maxItems"] == 2048
    assert schemas["EmbedRequest"]["properties"]["dimensions"]["anyOf"][0]["maximum"] == 32
    assert schemas["EmbedRequest"]["properties"]["prompt_name"]["type"] == "null"
    assert schemas["RerankRequest"]["properties"]["texts"]["minItems"] == 1
    assert schemas["SimilarityInput"]["properties"]["sentences"]["maxItems"] == 31
    assert "not" in schemas["EncodeRequest"]


def test_openapi_declares_the_api_key_where_it_is_needed(minilm_server):
    doc = httpx.get(f"{minilm_server.url}/openapi.json", timeout=30).json()
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert doc["paths"]["/embed"]["post"]["security"] == [{"bearer": []}]
    assert "401" in doc["paths"]["/info"]["get"]["responses"]
    assert "security" not in doc["paths"]["/health"]["get"]
    response = httpx.post(f"{minilm_server.url}/embed", json={"inputs": "x"},
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert response.status_code == 200
