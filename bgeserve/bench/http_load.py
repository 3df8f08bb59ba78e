"""The HTTP mode: a closed-loop load generator against one running server's embedding endpoint.

Each of C clients sends a request, waits for the answer, sends the next, until the duration or the
request count is used up. Only the URL given is contacted; redirects are not followed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from bgeserve.bench.stats import LatencySummary, summarize

OPENAI_PATH = "/v1/embeddings"


@dataclass(frozen=True)
class Target:
    """Where to send, and in which wire format."""

    url: str
    wire: str  # "openai" ({"input": [...], "model": ...}) or "tei" ({"inputs": [...]})
    model: str = "bgeserve"

    def payload(self, texts: list[str]) -> dict:
        if self.wire == "tei":
            return {"inputs": texts}
        return {"input": texts, "model": self.model}


def resolve_target(url: str, model: str = "bgeserve") -> Target:
    """`http://host:port` -> its /v1/embeddings; a URL ending in /embed speaks TEI's format instead."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--url must be an http(s) URL such as http://127.0.0.1:8080, not {url!r}")
    path = parts.path.rstrip("/")
    if not path:
        return Target(url.rstrip("/") + OPENAI_PATH, "openai", model)
    if path.endswith("/embed"):
        return Target(url, "tei", model)
    if path.endswith("/embeddings"):
        return Target(url, "openai", model)
    raise ValueError(f"--url path {path!r} is neither an OpenAI /v1/embeddings nor a TEI /embed endpoint")


@dataclass
class LevelResult:
    """What one concurrency level measured."""

    concurrency: int
    requests: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)  # HTTP status or exception name -> count
    seconds: float = 0.0
    texts: int = 0
    tokens: int | None = None
    latency_ms: list[float] = field(default_factory=list)

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.tokens is not None and self.seconds else None

    @property
    def latency(self) -> LatencySummary | None:
        return summarize(self.latency_ms)

    def as_dict(self) -> dict:
        """JSON-ready form."""
        summary = self.latency
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "ok": self.ok,
            "errors": dict(self.errors),
            "seconds": self.seconds,
            "texts_per_s": self.texts_per_s,
            "tokens_per_s": self.tokens_per_s,
            "latency_ms": summary.as_dict() if summary else None,
        }


@dataclass(frozen=True)
class LoadSettings:
    """How hard and how long to push."""

    concurrency: tuple[int, ...] = (1, 8, 64)
    duration_s: float | None = 30.0
    requests: int | None = None  # per level; with a duration too, whichever ends first
    batch: int = 1  # texts per request
    timeout_s: float = 60.0
    warmup_requests: int = 2


def _response_tokens(response) -> int | None:
    """Tokens the server says it computed: OpenAI `usage.prompt_tokens` or TEI's x-compute-tokens."""
    header = response.headers.get("x-compute-tokens")
    if header and header.isdigit():
        return int(header)
    try:
        usage = response.json().get("usage") or {}
    except (ValueError, AttributeError):
        return None
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) else None


async def run_level(
    client, target: Target, texts: list[str], concurrency: int, settings: LoadSettings
) -> LevelResult:
    """C clients in a closed loop until the deadline or the request budget; texts taken round-robin."""
    result = LevelResult(concurrency)
    issued = 0
    cursor = 0
    tokens_seen = True
    start = time.perf_counter()
    deadline = start + settings.duration_s if settings.duration_s else None

    def next_batch() -> list[str] | None:
        nonlocal issued, cursor
        if settings.requests is not None and issued >= settings.requests:
            return None
        if deadline is not None and time.perf_counter() >= deadline:
            return None
        issued += 1
        batch = [texts[(cursor + i) % len(texts)] for i in range(settings.batch)]
        cursor = (cursor + settings.batch) % len(texts)
        return batch

    async def client_loop() -> None:
        nonlocal tokens_seen
        while (batch := next_batch()) is not None:
            sent = time.perf_counter()
            try:
                response = await client.post(target.url, json=target.payload(batch))
            except Exception as exc:  # noqa: BLE001 - every failure is counted by its kind, none ends the run
                result.errors[type(exc).__name__] += 1
                continue
            finally:
                result.requests += 1
            if response.status_code != 200:
                result.errors[str(response.status_code)] += 1
                continue
            result.ok += 1
            result.texts += len(batch)
            result.latency_ms.append((time.perf_counter() - sent) * 1000.0)
            tokens = _response_tokens(response)
            if tokens is None:
                tokens_seen = False
            else:
                result.tokens = (result.tokens or 0) + tokens

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - start
    if not tokens_seen:
        result.tokens = None  # some answers did not say: a partial sum would understate
    return result


async def run_load(target: Target, texts: list[str], settings: LoadSettings,
                   progress=lambda _msg: None) -> list[LevelResult]:
    """Checks the server answers, warms it up, then runs each concurrency level in turn."""
    import httpx

    if not texts:
        raise ValueError("the corpus has no texts to send")
    if settings.duration_s is None and settings.requests is None:
        raise ValueError("give --duration or --requests, or both")
    most = max(settings.concurrency)
    limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
    async with httpx.AsyncClient(timeout=settings.timeout_s, limits=limits, follow_redirects=False) as client:
        for i in range(max(1, settings.warmup_requests)):
            try:
                response = await client.post(target.url, json=target.payload(texts[: settings.batch]))
            except httpx.HTTPError as exc:
                raise ConnectionError(f"cannot reach {target.url}: {type(exc).__name__}: {exc}") from exc
            if i == 0 and response.status_code != 200:
                raise ConnectionError(
                    f"{target.url} answered {response.status_code} to a {target.wire} request: "
                    f"{response.text[:200]}"
                )
        results = []
        for level in settings.concurrency:
            progress(f"concurrency {level}: running")
            results.append(await run_level(client, target, texts, level, settings))
            r = results[-1]
            progress(f"concurrency {level}: {r.texts_per_s:.2f} texts/s, {r.ok}/{r.requests} ok")
        return results
