"""Ray against one process, on the same cores: Serve HTTP throughput against plain `bgeserve serve`, and the
Ray Data corpus job against `bgeserve encode`, as ratios, in one run.

    .venv/bin/python scripts/ray_bench.py [--synthetic full|tiny | --model DIR] [--duration 30]
        [--concurrency 8] [--corpus-rows 128] [--batch-size 32] [--json out.json]

HTTP: the same closed-loop load (`bgeserve bench --url`'s generator: C clients, one text of
bgeserve/data/mixed.txt per request) against `bgeserve serve --threads N` and against the Serve app with
one replica of N threads on a local Ray of N CPUs. Corpus: the corpus texts repeated to --corpus-rows
rows as JSON lines, through `bgeserve encode --threads N` and through the job (one actor of N threads).
Steady rates leave out start-up (model load; Ray's start): `bgeserve encode` is timed on one row too,
the job reports when its first rows came back. CPU seconds of every process are sampled around each
measurement, by role (model, Serve proxy, tokenisation tasks, Ray's own daemons, this driver).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bgeserve.bench.http_load import LoadSettings, Target, run_load
from bgeserve.data import sample_texts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def role(proc: psutil.Process) -> str | None:
    """What a process does here, from its command line (Ray names its workers `ray::<actor or task>`)."""
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if proc.pid == os.getpid():
        return "driver (load generator / job driver)"
    if "ServeReplica" in cmd or "CorpusEmbedder" in cmd or "bgeserve serve" in cmd or "bgeserve encode" in cmd:
        return "model (replica / actor / process)"
    if "ProxyActor" in cmd:
        return "Serve proxy"
    if "tokenize" in cmd or "ReadCorpusSource" in cmd:
        return "read + tokenise tasks"
    if any(k in cmd for k in ("gcs_server", "raylet", "dashboard", "log_monitor", "ray::", "monitor.py",
                              "runtime_env", "ServeController")):
        return "Ray's own processes"
    return None


class CpuMeter:
    """CPU seconds by role between `start()` and `stop()` (processes that start in between count from 0)."""

    def start(self) -> None:
        self.before = self._sample()
        self.wall = time.perf_counter()

    def stop(self) -> dict[str, float]:
        after = self._sample()
        wall = time.perf_counter() - self.wall
        used: dict[str, float] = {}
        for pid, (name, seconds) in after.items():
            used[name] = used.get(name, 0.0) + seconds - self.before.get(pid, (name, 0.0))[1]
        return {name: round(seconds / wall, 3) for name, seconds in sorted(used.items())}  # cores busy

    @staticmethod
    def _sample() -> dict[int, tuple[str, float]]:
        """This process and its descendants only (the local Ray, the servers started here): other work on
        the machine is not ours to count."""
        sample = {}
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            name = role(proc)
            if name is None:
                continue
            try:
                times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            sample[proc.pid] = (name, times.user + times.system)
        return sample


def http_load(url: str, texts: list[str], args) -> tuple[dict, dict]:
    meter = CpuMeter()
    settings = LoadSettings(concurrency=(args.concurrency,), duration_s=args.duration, warmup_requests=4)

    async def measure():
        # Warm-up (first requests) outside the meter.
        async with httpx.AsyncClient(timeout=120) as client:
            for text in texts[: args.concurrency]:
                await client.post(url, json={"input": [text], "model": "m"})
        meter.start()
        (level,) = await run_load(Target(url, "openai", "m"), texts, settings)
        return level, meter.stop()

    level, cpu = asyncio.run(measure())
    return {"texts_per_s": round(level.texts_per_s, 3), "ok": level.ok, "errors": dict(level.errors),
            "seconds": round(level.seconds, 1), **colbert_request(url.replace("/v1/embeddings", "/encode"), texts),
            }, cpu


def colbert_request(url: str, texts: list[str], runs: int = 5) -> dict:
    """One text's dense + ColBERT vectors as JSON floats, alone: median ms and the answer's bytes (what a
    replica hands the proxy and the proxy the client)."""
    text = max(texts, key=len)
    times, size = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        answer = httpx.post(url, json={"input": text, "return_colbert_vecs": True}, timeout=300)
        times.append((time.perf_counter() - started) * 1000)
        answer.raise_for_status()
        size = len(answer.content)
    return {"colbert_request_ms_p50": round(sorted(times)[len(times) // 2], 1), "colbert_answer_bytes": size}


def tokenizer_rate(model: Path, texts: list[str]) -> float:
    """Texts/s the model's tokenizer alone manages on this machine (one call over the corpus, repeated)."""
    from bgeserve.models.checkpoint import load_checkpoint

    tokenizer = load_checkpoint(str(model)).tokenizer
    batch = texts * 20
    started = time.perf_counter()
    tokenizer.encode(batch, 512, truncate=True)
    return round(len(batch) / (time.perf_counter() - started), 1)


def plain_serve(model: Path, texts: list[str], args) -> tuple[dict, dict]:
    port = free_port()
    log = open(Path(args.work) / "plain.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "bgeserve", "serve", "--model", str(model), "--devices", "cpu", "--dtype", "fp32",
         "--threads", str(args.threads), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", process)
        return http_load(f"http://127.0.0.1:{port}/v1/embeddings", texts, args)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
        log.close()


def ray_serve(model: Path, texts: list[str], args) -> tuple[dict, dict]:
    import ray
    from ray import serve

    from bgeserve.ray import app

    port = free_port()
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, logging_level="warning",
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app({"model": str(model), "dtype": "fp32", "threads": str(args.threads),
                       "num_cpus_per_replica": str(args.threads), "num_replicas": "1"}), name="bgeserve")
        idle = CpuMeter()
        idle.start()
        time.sleep(10)
        idle_cpu = idle.stop()
        result, cpu = http_load(f"http://127.0.0.1:{port}/v1/embeddings", texts, args)
        result["idle_cores"] = idle_cpu
        serve.shutdown()
        return result, cpu
    finally:
        ray.shutdown()


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


def encode_cli(model: Path, corpus: Path, one_row: Path, args) -> tuple[dict, dict]:
    def run(source: Path) -> float:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "bgeserve", "encode", "--model", str(model), "--dtype", "fp32", "--threads",
             str(args.threads), "--batch-size", str(args.batch_size), "--no-progress", "-i", str(source),
             "-o", str(Path(args.work) / "encode.jsonl")],
            check=True, timeout=3600,
        )
        return time.perf_counter() - started

    fixed = run(one_row)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = run(corpus)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The process has exited by the time a sample could see it: its own accounting, as children's.
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    cpu = {"model (replica / actor / process)": round(used / wall, 3)}
    steady = (args.corpus_rows - 1) / max(wall - fixed, 1e-9)
    return {"rows_per_s_end_to_end": round(args.corpus_rows / wall, 3), "rows_per_s_steady": round(steady, 3),
            "seconds": round(wall, 1), "startup_seconds": round(fixed, 1)}, cpu


def corpus_job(model: Path, corpus: Path, args) -> tuple[dict, dict]:
    import ray

    from bgeserve.ray import run_corpus_job

    # One actor reserves most of the CPUs and runs all the threads; tokenisation tasks take the rest.
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, logging_level="warning",
             log_to_driver=False)
    try:
        meter = CpuMeter()
        meter.start()
        summary = run_corpus_job(
            str(corpus), Path(args.work) / "job-out", model=str(model), dtype="fp32", concurrency=1,
            num_cpus=max(args.threads - 0.5, 0.5), threads=args.threads, tokenize_num_cpus=0.5, progress=False,
            batch_size=args.batch_size, block_rows=args.batch_size,  # a task per batch: the steady rate shows
        )
        cpu = meter.stop()
    finally:
        ray.shutdown()
    return {"rows_per_s_end_to_end": round(summary.rows_per_second, 3),
            "rows_per_s_steady": round(summary.steady_rows_per_second, 3),
            "seconds": round(summary.seconds, 1), "startup_seconds": round(summary.startup_seconds, 1),
            "tokens_per_s": round(summary.tokens_per_second, 1)}, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory")
    source.add_argument("--synthetic", default="full", choices=["tiny", "full"],
                        help="generated bge-m3 (cached in ~/.cache/bgeserve; default full)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores for each side (default all)")
    parser.add_argument("--concurrency", type=int, default=8, help="HTTP clients at once (default 8)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of HTTP load per server (default 30)")
    parser.add_argument("--corpus-rows", type=int, default=128, help="rows of the corpus file (default 128)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="texts per forward pass of the corpus runs, both sides (default 32)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    if args.model:
        model = Path(args.model)
    else:
        from bgeserve.bench.model_source import synthetic_checkpoint

        model = synthetic_checkpoint(args.synthetic, Path.home() / ".cache" / "bgeserve", log=print)
    texts = sample_texts()
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        corpus = Path(work) / "corpus.jsonl"
        with corpus.open("w") as f:
            for i in range(args.corpus_rows):
                f.write(json.dumps({"id": i, "text": texts[i % len(texts)]}, ensure_ascii=False) + "\n")
        one_row = Path(work) / "one.jsonl"
        one_row.write_text(json.dumps({"id": 0, "text": texts[0]}) + "\n")
        load = [os.getloadavg()[0]]
        results: dict = {}
        for name, run in (("http_plain", lambda: plain_serve(model, texts, args)),
                          ("http_ray_serve", lambda: ray_serve(model, texts, args)),
                          ("encode_cli", lambda: encode_cli(model, corpus, one_row, args)),
                          ("corpus_job", lambda: corpus_job(model, corpus, args))):
            print(f"== {name}", flush=True)
            figures, cpu = run()
            results[name] = {**figures, "cores_busy_by_role": cpu}
            load.append(os.getloadavg()[0])
            print(json.dumps(results[name], indent=1), flush=True)
    results["tokenizer_texts_per_s"] = tokenizer_rate(model, texts)
    results["ratios"] = {
        "serve_over_plain_texts_per_s": round(results["http_ray_serve"]["texts_per_s"]
                                              / results["http_plain"]["texts_per_s"], 3),
        "job_over_encode_steady": round(results["corpus_job"]["rows_per_s_steady"]
                                        / results["encode_cli"]["rows_per_s_steady"], 3),
        "job_over_encode_end_to_end": round(results["corpus_job"]["rows_per_s_end_to_end"]
                                            / results["encode_cli"]["rows_per_s_end_to_end"], 3),
    }
    import ray
    import torch

    results["setup"] = {
        "model": str(model), "threads": args.threads, "concurrency": args.concurrency, "duration_s": args.duration,
        "corpus_rows": args.corpus_rows, "batch_size": args.batch_size,
        "python": platform.python_version(), "torch": torch.__version__,
        "ray": ray.__version__, "load_average_1min": load,
    }
    print(json.dumps(results["ratios"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
