"""Every bad input of the issue gets a 4xx JSON error naming the problem, and the server keeps serving."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest

LONG = "word " * 600  # over the tiny bge-m3's 512 tokens
TOO_MANY = ["x"] * 33  # over the default --max-client-batch-size of 32

# (path, body: dict to send as JSON or bytes to send raw, expected status, words the message must hold)
CASES = [
    ("/embed", b'{"inputs": "unterminated', 400, "not valid JSON"),
    ("/v1/embeddings", b'{"input": [1, 2', 400, "not valid JSON"),
    ("/embed", b'{"inputs": "\xff\xfe caf\xe9"}', 400, "UTF-8"),
    ("/v1/embeddings", b"[1, 2, 3]", 400, "JSON object"),
    ("/embed", {"inputs": 5}, 422, "inputs"),
    ("/embed", {"inputs": "x", "normalize": "maybe"}, 422, "normalize"),
    ("/v1/embeddings", {"input": ["a", 1]}, 400, "not mixed"),
    ("/v1/embeddings", {"input": [True, False]}, 400, "input"),
    ("/embed", {}, 422, "field required"),
    ("/v1/embeddings", {"model": "x"}, 400, "field required"),
    ("/rerank", {"query": "q"}, 422, "texts"),
    ("/embed", {"inputs": ""}, 400, "empty string"),
    ("/v1/embeddings", {"input": ""}, 400, "empty string"),
    ("/embed", {"inputs": []}, 400, "no inputs"),
    ("/v1/embeddings", {"input": []}, 400, "no inputs"),
    ("/v1/embeddings", {"input": [[]]}, 400, "empty list"),
    ("/rerank", {"query": "q", "texts": []}, 400, "cannot be empty"),
    ("/score", {"pairs": []}, 400, "cannot be empty"),
    ("/embed", {"inputs": TOO_MANY}, 422, "limit of 32"),
    ("/v1/embeddings", {"input": ["x"] * 2049}, 400, "limit of 2048 (--max-openai-batch-size)"),
    ("/rerank", {"query": "q", "texts": TOO_MANY}, 422, "limit of 32"),
    ("/embed", {"inputs": LONG, "truncate": False}, 422, "limit of 512"),
    ("/embed_sparse", {"inputs": ["ok", LONG], "truncate": False}, 422, "input 1"),
    ("/encode", {"input": LONG, "truncate": False}, 400, "limit of 512"),
    ("/v1/embeddings", {"input": [[0, 5, 999_999_999]]}, 400, "vocabulary"),
    ("/v1/embeddings", {"input": [0, -3, 2]}, 400, "vocabulary"),
    ("/embed", {"inputs": [[0, 5, 10**6]]}, 422, "vocabulary"),
    ("/decode", {"ids": [0, 10**7]}, 422, "vocabulary"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, 400, "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": -4}, 400, "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": 33}, 400, "dimensions"),
    ("/embed", {"inputs": "x", "dimensions": 4096}, 422, "dimensions"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ("/encode", {"input": "x", "encoding_format": "float16"}, 400, "encoding_format"),
    ("/embed", b'{"inputs": "caf\\ud800"}', 422, "surrogate"),  # a JSON escape of a lone surrogate
    ("/embed", {"inputs": "x", "truncation_direction": "middle"}, 422, "truncation_direction"),
    ("/embed", {"inputs": "x", "prompt_name": "query"}, 422, "prompt"),
    ("/encode", {"input": "x", "return_dense": False}, 400, "nothing to return"),
    ("/encode", {"input": "x", "max_length": 0}, 400, "max_length"),
    ("/score", {"pairs": [["only one"]]}, 400, "pairs"),
    ("/score", {"pairs": [["a", "b"]], "weights_for_different_modes": [1, 1]}, 400, "weights"),
    ("/score", {"pairs": [["a", "b"]], "weights_for_different_modes": [0, 0, 0]}, 400, "zero"),
    ("/rerank", {"query": "q", "texts": ["a"], "weights_for_different_modes": [1, -1, 1]}, 422, "negative"),
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
    ("path", "body", "status", "words"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_input_is_a_4xx_json_error(http, path, body, status, words):
    response = _send(http, path, body)
    assert response.status_code == status, response.text
    payload = response.json()
    if path.startswith(("/v1", "/encode", "/score")):
        error = payload["error"]
        assert set(error) == {"message", "type", "param", "code"}
        message = error["message"]
    else:
        assert set(payload) == {"error", "error_type"}
        assert payload["error_type"] in {"Validation", "Empty"}
        message = payload["error"]
    assert words.lower() in message.lower()


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
