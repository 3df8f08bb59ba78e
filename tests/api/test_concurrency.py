"""Hundreds of concurrent requests of mixed lengths: every answer equals its texts embedded alone."""

from __future__ import annotations

import asyncio
import random

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

CLIENTS = 16
REQUESTS_PER_CLIENT = 20


def metric_total(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    text = httpx.get(f"{url}/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@pytest.fixture(scope="module")
def references(m3_embedder, mixed_texts):
    """Each corpus line embedded on its own, in process: dense, lexical weights, ColBERT vectors."""
    refs = {}
    for text in mixed_texts:
        out = m3_embedder.encode(text, return_dense=True, return_sparse=True, return_colbert_vecs=True)
        refs[text] = out
    return refs


def _check(route: str, texts: list[str], body, references) -> None:
    if route == "/encode":
        assert [item["index"] for item in body["data"]] == list(range(len(texts)))
        for text, item in zip(texts, body["data"], strict=True):
            ref = references[text]
            np.testing.assert_allclose(item["dense_vecs"], ref["dense_vecs"], atol=1e-5, err_msg=text)
            assert item["lexical_weights"].keys() == ref["lexical_weights"].keys(), text
            np.testing.assert_allclose(item["colbert_vecs"], ref["colbert_vecs"], atol=1e-5, err_msg=text)
    elif route == "/embed":
        for text, vec in zip(texts, body, strict=True):
            np.testing.assert_allclose(vec, references[text]["dense_vecs"], atol=1e-5, err_msg=text)
    else:
        for text, item in zip(texts, body["data"], strict=True):
            np.testing.assert_allclose(item["embedding"], references[text]["dense_vecs"], atol=1e-5)


def test_concurrent_mixed_requests_are_never_mixed_up(m3_server, references, mixed_texts):
    url = m3_server.url
    rng = random.Random(1234)
    plans = []
    for _ in range(CLIENTS):
        client_plan = []
        for _ in range(REQUESTS_PER_CLIENT):
            route = rng.choice(["/encode", "/embed", "/v1/embeddings"])
            texts = rng.sample(mixed_texts, rng.randint(1, 6))
            client_plan.append((route, texts))
        plans.append(client_plan)
    before_ok = metric_total(url, "bgeserve_requests_total", route="/encode", status="200")
    before_inputs = metric_total(url, "bgeserve_inputs_embedded_total")
    before_batches = metric_total(url, "bgeserve_batch_size_count")

    async def one_client(plan):
        results = []
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            for route, texts in plan:
                if route == "/encode":
                    body = {"input": texts, "return_sparse": True, "return_colbert_vecs": True}
                elif route == "/embed":
                    body = {"inputs": texts}
                else:
                    body = {"input": texts, "encoding_format": "float"}
                response = await client.post(route, json=body)
                results.append((route, texts, response.status_code, response.json()))
        return results

    async def everyone():
        return await asyncio.gather(*(one_client(plan) for plan in plans))

    all_results = [r for per_client in asyncio.run(everyone()) for r in per_client]
    assert len(all_results) == CLIENTS * REQUESTS_PER_CLIENT  # nothing lost
    for route, texts, status, body in all_results:
        assert status == 200, body
        _check(route, texts, body, references)

    encode_requests = sum(1 for route, *_ in all_results if route == "/encode")
    inputs = sum(len(texts) for _, texts, _, _ in all_results)
    after_ok = metric_total(url, "bgeserve_requests_total", route="/encode", status="200")
    assert after_ok - before_ok == encode_requests
    assert metric_total(url, "bgeserve_inputs_embedded_total") - before_inputs == inputs
    batches = metric_total(url, "bgeserve_batch_size_count") - before_batches
    # Requests shared forward passes, and both replicas worked.
    assert batches < CLIENTS * REQUESTS_PER_CLIENT
    for replica in ("cpu/0", "cpu/1"):
        assert metric_total(url, "bgeserve_batch_size_count", replica=replica) > 0
    assert metric_total(url, "bgeserve_inflight_inputs") == 0
    assert metric_total(url, "bgeserve_queue_depth") == 0


def test_metrics_move_as_requests_flow(m3_server):
    url = m3_server.url
    before = metric_total(url, "bgeserve_requests_total", route="/embed", status="200")
    tokens_before = metric_total(url, "bgeserve_tokens_embedded_total")
    errors_before = metric_total(url, "bgeserve_requests_total", route="/embed", status="400")
    response = httpx.post(f"{url}/embed", json={"inputs": ["metrics please", "and more"]})
    httpx.post(f"{url}/embed", json={"inputs": ""})
    assert metric_total(url, "bgeserve_requests_total", route="/embed", status="200") == before + 1
    assert metric_total(url, "bgeserve_requests_total", route="/embed", status="400") == errors_before + 1
    tokens = int(response.headers["x-compute-tokens"])
    assert metric_total(url, "bgeserve_tokens_embedded_total") == tokens_before + tokens
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "bgeserve_request_duration_seconds_bucket",
        "bgeserve_queue_duration_seconds_count",
        "bgeserve_tokenization_duration_seconds_count",
        "bgeserve_batch_inference_duration_seconds_count",
        "bgeserve_batch_tokens_count",
        "bgeserve_model_info",
    ):
        assert name in text
