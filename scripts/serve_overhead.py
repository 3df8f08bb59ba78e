"""Overhead of the HTTP service: the same texts through `bgeserve serve` and through the in-process engine.

    .venv/bin/python scripts/serve_overhead.py [--model DIR] [--clients 16] [--rounds 3]

Each text of bgeserve/data/mixed.txt is one request (the common client pattern); `--clients` of them
run at once. Prints texts/s and per-request p50/p99 latency for both paths.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from importlib import resources

import httpx


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def drive(call, texts: list[str], clients: int) -> tuple[float, list[float]]:
    """Runs `call(text)` for every text with `clients` concurrent callers; (seconds, latencies)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    latencies: list[float] = []

    async def worker():
        while not queue.empty():
            text = queue.get_nowait()
            started = time.perf_counter()
            await call(text)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - started, latencies


def report(name: str, seconds: float, latencies: list[float]) -> None:
    print(
        f"{name:<28} {len(latencies) / seconds:8.1f} texts/s   p50 {percentile(latencies, 50) * 1000:7.1f} ms"
        f"   p99 {percentile(latencies, 99) * 1000:7.1f} ms"
    )


async def in_process(model: str | None, texts: list[str], clients: int, rounds: int) -> None:
    from bgeserve.core import OutputRequest
    from bgeserve.engine.engine import EmbeddingEngine, EngineConfig
    from bgeserve.models.checkpoint import load_checkpoint

    engine = EmbeddingEngine.from_checkpoint(load_checkpoint(model), ["cpu"], config=EngineConfig())
    engine.warmup()
    engine.start()
    want = OutputRequest()

    async def call(text: str):
        await engine.encode([text], want)

    await drive(call, texts[:32], clients)  # warm-up
    for clients_now in (1, clients):
        seconds, latencies = await drive(call, texts * rounds, clients_now)
        report(f"in-process, {clients_now} clients", seconds, latencies)
    await engine.stop()


async def over_http(url: str, texts: list[str], clients: int, rounds: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as http:

        async def call(text: str):
            response = await http.post("/v1/embeddings", json={"input": text, "encoding_format": "float"})
            response.raise_for_status()

        await drive(call, texts[:32], clients)
        for clients_now in (1, clients):
            seconds, latencies = await drive(call, texts * rounds, clients_now)
            report(f"HTTP, {clients_now} clients", seconds, latencies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args()
    corpus = resources.files("bgeserve").joinpath("data/mixed.txt").read_text(encoding="utf-8")
    texts = [line for line in corpus.splitlines() if line.strip()]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"{len(texts)} texts x {args.rounds} rounds, one text per request, model {args.model or 'bundled MiniLM'}")

    asyncio.run(in_process(args.model, texts, args.clients, args.rounds))

    command = [sys.executable, "-m", "bgeserve", "serve", "--devices", "cpu", "--port", str(args.port),
               "--log-level", "warning"]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command)
    try:
        url = f"http://127.0.0.1:{args.port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        asyncio.run(over_http(url, texts, args.clients, args.rounds))
    finally:
        server.terminate()
        server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
