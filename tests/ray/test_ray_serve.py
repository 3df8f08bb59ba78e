"""The Ray Serve application on a local Ray: bgeserve's HTTP contract through Serve's proxy.

Two CPU replicas of the tiny bge-m3 answer the route suite exactly as a plain `bgeserve serve` with the
same settings does; concurrent requests each get their own vectors; replicas report through Ray's
metrics; a killed replica fails only its in-flight requests (each with a JSON error) and is replaced;
full slots and Serve's own queue limit both answer 429 in bgeserve's shapes.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import ray
from deadlines import deadline, wait_for
from ray import serve

from bgeserve.ray import app
from bgeserve.ray.proxy_errors import CALLBACK_PATH, CALLBACK_VARIABLE
from tests.api.conftest import Server, free_port

API_KEY = "ray-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TEXTS = ["What is BGE M3?", "BM25 is a bag-of-words retrieval function", "日本語のテキストも扱える"]
# The same engine settings for both servers: threads 1 and fp32, so vectors match to the last bit.
SETTINGS = {"dtype": "fp32", "threads": "1", "api_key": API_KEY, "served_model_name": "m3"}
REQUEST_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def serve_url():
    """A local Ray (2 CPUs, no dashboard, metrics exported every second) with Serve on a free port."""
    port, metrics_port = free_port(), free_port()
    previous = os.environ.get(CALLBACK_VARIABLE)
    os.environ[CALLBACK_VARIABLE] = CALLBACK_PATH  # the proxy gives Ray's own errors bgeserve's shapes
    with deadline(90, "starting Ray and Serve"):
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False,
                 _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})
        # A bound on every request, as `bgeserve serve --ray --request-timeout` sets: whatever Ray does with
        # a killed replica's requests, each gets an answer within it.
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
    yield f"http://127.0.0.1:{port}", metrics_port
    with deadline(60, "stopping Serve and Ray"):
        serve.shutdown()
        ray.shutdown()
    if previous is None:
        os.environ.pop(CALLBACK_VARIABLE, None)
    else:
        os.environ[CALLBACK_VARIABLE] = previous


def deploy(m3_checkpoint, **args: str) -> None:
    """`serve run bgeserve.ray:app model=... key=value ...` (a second call updates the app in place)."""
    serve.run(app({"model": str(m3_checkpoint), **SETTINGS, **args}), name="bgeserve", route_prefix="/")


@pytest.fixture(scope="module")
def servers(serve_url, m3_checkpoint, tmp_path_factory):
    """(Serve URL, plain `bgeserve serve` URL): two replicas on Ray, one process beside it."""
    url, _ = serve_url
    plain_args = ["--model", str(m3_checkpoint), "--devices", "cpu", "--dtype", "fp32", "--api-key", API_KEY,
                  "--served-model-name", "m3"]
    with deadline(180, "deploying the app and starting the plain server"), ThreadPoolExecutor(1) as pool:
        plain = pool.submit(Server, plain_args, tmp_path_factory.mktemp("logs") / "plain.log")
        deploy(m3_checkpoint, num_replicas="2", num_cpus_per_replica="0.5", health_check_period_s="1")
        server = plain.result()
    yield url, server.url
    server.stop()


def replica_names() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::bgeserve#"))


def close(a, b, tol: float = 1e-6) -> bool:
    """Equal JSON, numbers to `tol`."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return abs(a - b) <= tol
    return a == b


ROUTES = [
    # name, method, path, JSON body (or raw bytes), authorised
    ("openai", "POST", "/v1/embeddings", {"input": TEXTS, "model": "m3"}, True),
    ("openai-ids", "POST", "/v1/embeddings", {"input": [[0, 6, 2]], "model": "m3"}, True),
    ("models", "GET", "/v1/models", None, True),
    ("tei-embed", "POST", "/embed", {"inputs": TEXTS}, True),
    ("tei-sparse", "POST", "/embed_sparse", {"inputs": TEXTS}, True),
    ("tei-rerank", "POST", "/rerank", {"query": "what is bge", "texts": TEXTS, "return_text": True}, True),
    ("tei-tokenize", "POST", "/tokenize", {"inputs": TEXTS[0]}, True),
    ("native-encode", "POST", "/encode",
     {"input": TEXTS, "return_sparse": True, "return_colbert_vecs": True}, True),
    ("native-score", "POST", "/score", {"query": "what is bge", "passages": TEXTS[:2]}, True),
    ("health", "GET", "/health", None, False),
    ("info", "GET", "/info", None, True),
    # An error of each family, the shapes and statuses of `bgeserve serve`.
    ("tei-empty", "POST", "/embed", {"inputs": []}, True),
    ("tei-too-many", "POST", "/embed", {"inputs": ["x"] * 33}, True),
    ("openai-empty", "POST", "/v1/embeddings", {"input": [], "model": "m3"}, True),
    ("openai-missing", "POST", "/v1/embeddings", {"model": "m3"}, True),
    ("native-limit", "POST", "/encode", {"input": "x", "max_length": 100_000}, True),
    ("malformed-json", "POST", "/embed", b"{not json", True),
    ("payload-too-large", "POST", "/embed", b'{"inputs": "' + b"x" * 2_100_000 + b'"}', True),
    ("unknown-route", "GET", "/nope", None, True),
    ("tei-no-key", "POST", "/embed", {"inputs": "x"}, False),
    ("openai-no-key", "POST", "/v1/embeddings", {"input": "x", "model": "m3"}, False),
]


@pytest.mark.parametrize(("name", "method", "path", "body", "authorised"), ROUTES, ids=[r[0] for r in ROUTES])
def test_route_answers_equal_the_single_process_server(servers, name, method, path, body, authorised):
    headers = dict(AUTH) if authorised else {}
    answers = []
    for base in servers:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
        answers.append(httpx.request(method, base + path, headers=headers, timeout=60, **kwargs))
    on_ray, plain = answers
    assert on_ray.status_code == plain.status_code, (on_ray.text[:300], plain.text[:300])
    assert on_ray.headers.get("content-type") == plain.headers.get("content-type")
    if on_ray.headers.get("content-type", "").startswith("application/json"):
        assert close(on_ray.json(), plain.json()), (on_ray.text[:300], plain.text[:300])
    else:
        assert on_ray.text == plain.text
    for header in ("x-compute-tokens", "www-authenticate"):
        assert on_ray.headers.get(header) == plain.headers.get(header)


def test_concurrent_requests_each_get_their_own_vectors(servers, m3_checkpoint):
    from bgeserve.embedder import Embedder

    url, _ = servers
    texts = [f"request {i}: {TEXTS[i % 3]} #{i * 7919 % 1000}" for i in range(64)]
    expected = Embedder(str(m3_checkpoint), device="cpu", dtype="fp32", threads=1).encode(texts)["dense_vecs"]

    async def flood():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(client.post("/embed", json={"inputs": t}) for t in texts))

    for response, vector in zip(asyncio.run(flood()), expected, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()[0], vector, atol=1e-6)


def test_replicas_report_their_figures_through_ray_metrics(servers, serve_url):
    url, _ = servers
    _, metrics_port = serve_url
    for i in range(8):
        assert httpx.post(f"{url}/embed", headers=AUTH, json={"inputs": f"counted {i}"}, timeout=60).status_code == 200

    def inputs_by_replica() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        counts: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("ray_bgeserve_inputs_embedded_total{") and 'deployment="bgeserve"' in line:
                replica = line.split('replica="', 1)[1].split('"', 1)[0]
                counts[replica] = counts.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
        return counts

    counts = wait_for(lambda: (c := inputs_by_replica()) and sum(c.values()) >= 8 and c, 30,
                      "ray_bgeserve_inputs_embedded_total on Ray's metrics port")
    assert all(replica for replica in counts)


def test_health_check_raises_when_the_engine_is_not_serving():
    from bgeserve.ray.serve_app import EmbeddingDeployment

    class Engine:
        healthy = False

        class replicas:  # noqa: N801 - stands in for the engine's replica pool
            healthy = False

    with pytest.raises(RuntimeError, match="model thread died"):
        EmbeddingDeployment.func_or_class.check_health(SimpleNamespace(_engine=Engine()))


def test_killed_replica_fails_only_its_requests_and_is_replaced(servers, m3_checkpoint):
    """Under load, one replica is killed: every request either has its own right vector or a JSON error
    (the replica's failure, no replica up, or at worst the proxy's request timeout); none hangs; Serve
    starts a new replica."""
    from bgeserve.embedder import Embedder

    url, _ = servers
    texts = [f"under load {i}" for i in range(240)]
    expected = Embedder(str(m3_checkpoint), device="cpu", dtype="fp32", threads=1).encode(texts)["dense_vecs"]
    before = replica_names()
    assert len(before) == 2

    async def load():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as client:
            tasks = []
            for i, text in enumerate(texts):
                tasks.append(asyncio.create_task(client.post("/v1/embeddings", json={"input": text, "model": "m3"})))
                await asyncio.sleep(0.01)
                if i == len(texts) // 3:
                    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
            return await asyncio.gather(*tasks, return_exceptions=True)

    started = time.monotonic()
    responses = asyncio.run(load())
    assert time.monotonic() - started < 60
    ok = failed = 0
    for response, vector in zip(responses, expected, strict=True):
        assert isinstance(response, httpx.Response), f"no answer: {response!r}"
        if response.status_code == 200:
            np.testing.assert_allclose(response.json()["data"][0]["embedding"], vector, atol=1e-6)
            ok += 1
        else:
            assert response.status_code in (500, 503, 504), response.text
            error = response.json()["error"]
            assert (error["type"], error["code"]) in (
                ("server_error", "replica_failed"), ("server_error", "unavailable"), ("timeout_error", "timeout"))
            failed += 1
    assert ok > len(texts) // 2
    wait_for(lambda: len(after := replica_names()) == 2 and after != before, 90, "a replacement replica")
    wait_for(lambda: httpx.get(f"{url}/health", timeout=10).status_code == 200, 30, "/health after replacement")


def test_full_slots_answer_429_in_bgeserve_shape(serve_url, m3_checkpoint):
    """Sixteen input slots and a 1 s batch window: a burst finds the slots taken, and the replica itself
    answers 429 (Serve's limit sits above its slots)."""
    url, _ = serve_url
    deploy(m3_checkpoint, num_replicas="1", max_concurrent_requests="16", max_client_batch_size="4",
           batch_wait_ms="1000")
    answers = _burst(url, 12)
    statuses = [status for status, _ in answers]
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1
    assert all("input slots" in message for status, message in answers if status == 429)


def test_serve_request_timeout_answers_504_in_bgeserve_shape(serve_url, m3_checkpoint):
    """A request still waiting for its batch when Serve's request timeout passes: the proxy's plain 408
    becomes the 504 of `--request-timeout` in the route family's shape (the header sets Serve's timeout
    for one request)."""
    url, _ = serve_url
    deploy(m3_checkpoint, num_replicas="1", batch_wait_ms="1000")
    late = {**AUTH, "x-request-timeout-seconds": "0.2"}
    openai = httpx.post(f"{url}/v1/embeddings", json={"input": ["a", "b"], "model": "m3"}, headers=late, timeout=30)
    assert openai.status_code == 504, openai.text
    error = openai.json()["error"]
    assert (error["type"], error["code"]) == ("timeout_error", "timeout") and "request_timeout_s" in error["message"]
    tei = httpx.post(f"{url}/embed", json={"inputs": ["a", "b"]}, headers=late, timeout=30)
    assert tei.status_code == 504 and tei.json()["error_type"] == "Timeout", tei.text
    # Within its time the same request is answered.
    assert httpx.post(f"{url}/embed", json={"inputs": ["a", "b"]}, headers=AUTH, timeout=30).status_code == 200


def test_serve_queue_limit_answers_429_in_bgeserve_shape(serve_url, m3_checkpoint):
    """With Serve's own limits below the slots, the proxy rejects: still a 429 in bgeserve's shapes."""
    url, _ = serve_url
    deploy(m3_checkpoint, num_replicas="1", max_concurrent_requests="16", max_client_batch_size="4",
           batch_wait_ms="1000", max_ongoing_requests="1", max_queued_requests="1")
    answers = _burst(url, 8)
    statuses = [status for status, _ in answers]
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1
    assert all("queue is full" in message for status, message in answers if status == 429)


def _burst(url: str, count: int) -> list[tuple[int, str]]:
    """`count` requests at once, half OpenAI, half TEI; checks each 429's shape and Retry-After.
    Returns (status, error message or "") per request."""

    async def flood():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(
                client.post("/embed", json={"inputs": [f"text {i}"] * 4}) if i % 2
                else client.post("/v1/embeddings", json={"input": [f"text {i}"] * 4, "model": "m3"})
                for i in range(count)
            ))

    answers = []
    for response in asyncio.run(flood()):
        assert response.status_code in (200, 429), response.text
        if response.status_code != 429:
            answers.append((200, ""))
            continue
        assert response.headers["retry-after"] == "1"
        body = response.json()
        if response.request.url.path == "/embed":
            assert body["error_type"] == "Overloaded"
            answers.append((429, body["error"]))
        else:
            assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "overloaded"
            answers.append((429, body["error"]["message"]))
    return answers
