"""Work per request follows the model's limit, not the body size: /tokenize and the embed routes on
near-payload-limit texts, against the real server (the tiny bge-m3 on two CPU replicas)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bgeserve.models.tokenizer import TextTokenizer

MIXED = (Path(__file__).parents[2] / "bgeserve" / "data" / "mixed.txt").read_text(encoding="utf-8")
# ~1.9 MB of UTF-8 (CJK, Arabic, emoji, code), under the 2 MB payload limit once in JSON.
HUGE = (MIXED * 100)[:1_150_000]


@pytest.fixture(scope="module")
def tokenizer(m3_checkpoint) -> TextTokenizer:
    return TextTokenizer.from_dir(m3_checkpoint)


@pytest.fixture(scope="module")
def whole_ids(tokenizer) -> list[int]:
    """The huge text's body tokens, tokenised whole here (the reference the server must match)."""
    return tokenizer._tok.encode(HUGE, add_special_tokens=False).ids


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_tokenize_of_a_huge_text_is_cut_to_the_model_limit_and_costs_little(m3_server, tokenizer, whole_ids):
    assert len(HUGE.encode()) > 1_800_000 and len(whole_ids) > 100_000
    before = _peak_rss_mb(m3_server.process.pid)
    started = time.monotonic()
    response = httpx.post(f"{m3_server.url}/tokenize", json={"inputs": HUGE}, timeout=120)
    seconds = time.monotonic() - started
    assert response.status_code == 200, response.text[:300]
    tokens = response.json()[0]
    # Exactly what the embed routes embed: the whole text's tokens cut to 512, special tokens kept.
    assert [t["id"] for t in tokens] == [0, *whole_ids[:510], 2]
    assert response.headers["x-truncated-inputs"] == "1"
    for token in tokens[1:-1]:
        assert HUGE[token["start"]:token["stop"]] == token["text"]
    # Before: a 52 MB answer, +900 MB of RSS and 7 s for a text like this one.
    assert len(response.content) < 200_000
    assert _peak_rss_mb(m3_server.process.pid) - before < 100
    assert seconds < 3


def test_tokenize_refuses_a_huge_text_when_told_not_to_cut(m3_server):
    response = httpx.post(f"{m3_server.url}/tokenize", json={"inputs": HUGE, "truncate": False}, timeout=120)
    assert response.status_code == 422
    assert "longer than the model's limit of 512" in response.json()["error"]


@pytest.mark.parametrize("direction", ["right", "left"])
def test_a_huge_text_embeds_as_its_whole_tokenisation_cut(m3_server, whole_ids, direction):
    cut = whole_ids[:510] if direction == "right" else whole_ids[-510:]
    with httpx.Client(base_url=m3_server.url, timeout=120) as client:
        text = client.post("/embed", json={"inputs": HUGE, "truncation_direction": direction})
        ids = client.post("/embed", json={"inputs": [[0, *cut, 2]]})
        tokenized = client.post("/tokenize", json={"inputs": HUGE, "truncation_direction": direction})
    assert text.status_code == 200 and ids.status_code == 200
    assert text.headers["x-truncated-inputs"] == "1" and text.headers["x-compute-tokens"] == "512"
    np.testing.assert_allclose(text.json()[0], ids.json()[0], atol=1e-5)
    assert [t["id"] for t in tokenized.json()[0]] == [0, *cut, 2]


def test_a_small_request_is_not_stalled_behind_four_huge_ones(m3_server):
    async def scenario() -> tuple[float, list[int]]:
        async with httpx.AsyncClient(base_url=m3_server.url, timeout=120) as client:
            huge = [asyncio.create_task(client.post("/embed", json={"inputs": HUGE})) for _ in range(4)]
            await asyncio.sleep(0.3)
            started = time.monotonic()
            small = await client.post("/embed", json={"inputs": "hi"})
            waited = time.monotonic() - started
            assert small.status_code == 200
            return waited, [r.status_code for r in await asyncio.gather(*huge)]

    waited, statuses = asyncio.run(scenario())
    assert statuses == [200] * 4
    # Before: ~12.6 s on this 2-core machine, each huge text tokenised whole (twice).
    assert waited < 2.5, waited
