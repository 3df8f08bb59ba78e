"""Every bad input of the issue gets a 4xx JSON error naming the problem, and the server keeps serving."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest

LONG = "word " * 600  # over the tiny bge-m3's 512 tokens
TOO_MANY = ["x"] * 33  # over the default --max-client-batch-size of 32

# (path, body: dict to send as JSON or bytes to send raw, status, kind, param, words the message must hold).
# `kind` is the error's `code` on the OpenAI-shaped routes (/v1, /encode, /score; their `type` is always
# invalid_request_error here) and its `error_type` on the TEI routes, which have no `param` (None).
# Statuses and kinds are those of bgeserve/api/errors.py: bad JSON 400 everywhere; on TEI routes Empty 400 and
# Validation 422; on the OpenAI-shaped ones everything 400.
CASES = [
    ("/embed", b'{"inputs": "unterminated', 400, "Validation", None, "not valid JSON"),
    ("/v1/embeddings", b'{"input": [1, 2', 400, "invalid_json", None, "not valid JSON"),
    ("/embed", b'{"inputs": "\xff\xfe caf\xe9"}', 400, "Validation", None, "UTF-8"),
    ("/v1/embeddings", b"[1, 2, 3]", 400, "invalid_value", None, "JSON object"),
    ("/embed", {"inputs": 5}, 422, "Validation", None, "inputs"),
    ("/embed", {"inputs": "x", "normalize": "maybe"}, 422, "Validation", None, "normalize"),
    ("/v1/embeddings", {"input": ["a", 1]}, 400, "invalid_value", "input", "not mixed"),
    ("/v1/embeddings", {"input": [True, False]}, 400, "invalid_value", "input", "input"),
    ("/embed", {}, 422, "Validation", None, "field required"),
    ("/v1/embeddings", {"model": "x"}, 400, "invalid_value", "input", "field required"),
    ("/rerank", {"query": "q"}, 422, "Validation", None, "texts"),
    ("/embed", {"inputs": ""}, 400, "Empty", None, "empty string"),
    ("/v1/embeddings", {"input": ""}, 400, "empty_input", "input", "empty string"),
    ("/embed", {"inputs": []}, 400, "Empty", None, "no inputs"),
    ("/v1/embeddings", {"input": []}, 400, "empty_input", "input", "no inputs"),
    ("/v1/embeddings", {"input": [[]]}, 400, "empty_input", "input", "empty list"),
    ("/rerank", {"query": "q", "texts": []}, 400, "Empty", None, "cannot be empty"),
    ("/score", {"pairs": []}, 400, "invalid_input", "pairs", "cannot be empty"),
    ("/score", {"pairs": [["q", "p"]] * 33}, 400, "invalid_input", "pairs", "33 pairs"),
    ("/embed", {"inputs": TOO_MANY}, 422, "Validation", None, "limit of 32"),
    ("/v1/embeddings", {"input": ["x"] * 2049}, 400, "invalid_input", "input",
     "limit of 2048 (--max-openai-batch-size)"),
    ("/rerank", {"query": "q", "texts": TOO_MANY}, 422, "Validation", None, "limit of 32"),
    ("/embed", {"inputs": LONG, "truncate": False}, 422, "Validation", None, "limit of 512"),
    ("/embed_sparse", {"inputs": ["ok", LONG], "truncate": False}, 422, "Validation", None, "input 1"),
    ("/encode", {"input": LONG, "truncate": False}, 400, "context_length_exceeded", "input", "limit of 512"),
    ("/v1/embeddings", {"input": [[0, 5, 999_999_999]]}, 400, "invalid_input", "input", "vocabulary"),
    ("/v1/embeddings", {"input": [0, -3, 2]}, 400, "invalid_input", "input", "vocabulary"),
    ("/embed", {"inputs": [[0, 5, 10**6]]}, 422, "Validation", None, "vocabulary"),
    ("/decode", {"ids": [0, 10**7]}, 422, "Validation", None, "vocabulary"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, 400, "invalid_input", "dimensions", "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": -4}, 400, "invalid_input", "dimensions", "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": 33}, 400, "invalid_input", "dimensions", "dimensions"),
    ("/embed", {"inputs": "x", "dimensions": 4096}, 422, "Validation", None, "dimensions"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 400, "invalid_value", "encoding_format",
     "encoding_format"),
    ("/encode", {"input": "x", "encoding_format": "float16"}, 400, "invalid_value", "encoding_format",
     "encoding_format"),
    ("/embed", b'{"inputs": "caf\\ud800"}', 422, "Validation", None, "surrogate"),  # JSON escape of a lone surrogate
    ("/embed", {"inputs": "x", "truncation_direction": "middle"}, 422, "Validation", None, "truncation_direction"),
    ("/embed", {"inputs": "x", "prompt_name": "query"}, 422, "Validation", None, "prompt"),
    ("/encode", {"input": "x", "return_dense": False}, 400, "invalid_input", "return_dense", "nothing to return"),
    ("/encode", {"input": "x", "max_length": 0}, 400, "invalid_input", "max_length", "max_length"),
    ("/score", {"pairs": [["only one"]]}, 400, "invalid_value", "pairs", "pairs"),
    ("/score", {"pairs": [["a", "b"]], "weights_for_different_modes": [1, 1]}, 400, "invalid_value",
     "weights_for_different_modes", "weights"),
    ("/score", {"pairs": [["a", "b"]], "weights_for_different_modes": [0, 0, 0]}, 400, "invalid_input",
     "weights_for_different_modes", "zero"),
    ("/rerank", {"query": "q", "texts": ["a"], "weights_for_different_modes": [1, -1, 1]}, 422, "Validation", None,
     "negative"),
]


def _send(http: httpx.Client, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"content-type": "application/json"})
    return http.post(path, json=body)


@pytest.fixture(scope="module")
def http(m3_server) -> httpx.Client:
    with httpx.Client(base_url=m3_server.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize(
    ("path", "body", "status", "kind", "param", "words"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_input_is_a_4xx_json_error(http, path, body, status, kind, param, words):
    response = _send(http, path, body)
    assert response.status_code == status, response.text
    payload = response.json()
    if path.startswith(("/v1", "/encode", "/score")):
        error = payload["error"]
        assert set(payload) == {"error"} and set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("invalid_request_error", kind), error
        assert error["param"] == param, error
        message = error["message"]
    else:
        assert set(payload) == {"error", "error_type"}
        assert payload["error_type"] == kind, payload
        message = payload["error"]
    assert isinstance(message, str) and words.lower() in message.lower()


def test_nan_and_infinite_numbers_are_refused(http):
    # Python's JSON reader accepts NaN and Infinity literals: they must not reach the scores.
    for literal in ("NaN", "Infinity", "-Infinity"):
        body = f'{{"pairs": [["a", "b"]], "weights_for_different_modes": [{literal}, 1, 1]}}'.encode()
        response = http.post("/score", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert "weights_for_different_modes" in response.json()["error"]["message"]


def test_degenerate_inputs_never_come_back_as_nan(http):
    # Only padding / special tokens, a one-dimension cut of such a vector, repeated special ids.
    for body in (
        {"input": [[0, 1, 1, 1, 1, 2]], "encoding_format": "float"},
        {"input": [[0, 2]], "dimensions": 1, "encoding_format": "float"},
        {"input": [[0, *[3] * 40, 2]], "encoding_format": "float"},
    ):
        response = http.post("/v1/embeddings", json=body)
        assert response.status_code == 200, response.text
        values = response.json()["data"][0]["embedding"]
        assert values and all(math.isfinite(v) for v in values)
    response = http.post("/encode", json={"input": [[0, 2]], "return_sparse": True, "return_colbert_vecs": True})
    assert response.status_code == 200
    item = response.json()["data"][0]
    assert np.isfinite(item["dense_vecs"]).all() and np.isfinite(item["colbert_vecs"]).all()


def test_body_over_the_payload_limit_is_413_even_when_chunked(http):
    big = json.dumps({"inputs": ["y" * 1000] * 2100}).encode()  # ~2.1 MB > 2 MB
    declared = http.post("/embed", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and declared.json()["error_type"] == "Validation"
    assert "2000000" in declared.json()["error"]

    def chunks():
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    chunked = http.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert chunked.json()["error"]["code"] == "payload_too_large"


def test_server_keeps_serving_after_bad_input(http):
    assert http.get("/health").status_code == 200
    assert len(http.post("/embed", json={"inputs": ["still", "fine"]}).json()) == 2


def test_unknown_route_and_method(http):
    assert http.post("/nope", json={}).status_code == 404
    assert http.get("/embed").status_code == 405
