"""The timing protocol every row goes through, ours and peers alike: warm-up, repeats, medians, memory."""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# encode(texts) -> dense vectors [len(texts), hidden], float32, L2-normalised, in input order.
EncodeFn = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class MeasureOptions:
    """How many times each measurement runs (after one untimed warm-up of each kind)."""

    repeats: int = 3  # passes over the whole corpus; texts/s comes from the median pass
    query_runs: int = 10  # single short query
    batch_runs: int = 3  # one request-sized batch
    warmup: bool = True


@dataclass
class Measurement:
    """Raw samples of one row; the report derives rates and percentiles from them."""

    corpus_seconds: list[float] = field(default_factory=list)
    query_ms: list[float] = field(default_factory=list)
    batch_ms: list[float] = field(default_factory=list)
    load_seconds: float = 0.0
    peak_memory_bytes: int | None = None
    memory_kind: str = "rss"  # "rss": process resident memory above its level before loading; "cuda"
    matmul_tflops: float | None = None  # the device's own product rate in this precision (CUDA rows)
    notes: list[str] = field(default_factory=list)  # what the row's library reports it ran (its `notes`)
    dense: np.ndarray | None = None


def run_protocol(
    encode: EncodeFn,
    texts: list[str],
    query: str,
    batch: list[str],
    options: MeasureOptions,
) -> Measurement:
    """Times `encode` on the corpus, the query and the batch; keeps the corpus vectors for fidelity."""
    result = Measurement()
    if options.warmup:
        warm_up(encode, query, batch)
    result.query_ms = timed_calls(encode, [query], options.query_runs)
    result.batch_ms = timed_calls(encode, batch, options.batch_runs)
    for _ in range(max(1, options.repeats)):
        seconds, dense = timed_pass(encode, texts)
        result.corpus_seconds.append(seconds)
    result.dense = dense
    return result


def warm_up(encode: EncodeFn, query: str, batch: list[str]) -> None:
    """First calls pay for lazy initialisation (kernels, thread pools, allocator growth): one of each kind."""
    encode([query])
    encode(batch)


def timed_calls(encode: EncodeFn, texts: list[str], runs: int) -> list[float]:
    """Milliseconds of each of `runs` calls of `encode(texts)`."""
    return [_timed(encode, texts) * 1000.0 for _ in range(runs)]


def timed_pass(encode: EncodeFn, texts: list[str]) -> tuple[float, np.ndarray]:
    """Seconds of one pass over the corpus, and its vectors."""
    start = time.perf_counter()
    dense = encode(texts)
    return time.perf_counter() - start, np.asarray(dense, dtype=np.float32)


def _timed(encode: EncodeFn, texts: list[str]) -> float:
    start = time.perf_counter()
    encode(texts)
    return time.perf_counter() - start


class PeakMemory:
    """Peak memory while a row loads and runs, above the level at `start()`.

    On CPU it samples the process's resident set every few milliseconds (a thread reading
    /proc/self/statm; torch and onnxruntime release the GIL while they compute). On CUDA it uses
    torch.cuda.max_memory_allocated, which counts tensors only, not the CUDA context.
    """

    def __init__(self, device: str = "cpu", interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self._base = 0
        self._peak = 0
        self._stop = threading.Event()
        self._active = threading.Event()  # cleared while paused: the sampling thread then sleeps
        self._active.set()
        self._sampling = threading.Lock()  # a sample begun before a pause does not land after it
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return "cuda" if self.device.startswith("cuda") else "rss"

    def start(self) -> None:
        if self.kind == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = self._peak = torch.cuda.memory_allocated(self.device)
            return
        self._base = self._peak = current_rss_bytes()
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Stops sampling; returns the peak in bytes above the starting level."""
        if self.kind == "cuda":
            if self._active.is_set():
                self._peak = max(self._peak, self._cuda_peak())
            return max(0, self._peak - self._base)
        counting = self._active.is_set()
        self._stop.set()
        self._active.set()
        if self._thread is not None:
            self._thread.join()
        if counting:
            self._peak = max(self._peak, current_rss_bytes())
        return max(0, self._peak - self._base)

    def pause(self) -> None:
        """Stops counting (after one last reading) until `resume`: what runs meanwhile is not the row's (a
        timed product's operands), or allocates nothing (a row waiting for its turn between the phases of an
        interleaved run, which should not wake 200 times a second either)."""
        with self._sampling:
            if self._active.is_set():
                self._peak = max(self._peak, self._cuda_peak() if self.kind == "cuda" else current_rss_bytes())
            self._active.clear()

    def resume(self) -> None:
        if self.kind == "cuda" and not self._active.is_set():
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)  # what the pause saw is in self._peak already
        self._active.set()

    def _cuda_peak(self) -> int:
        import torch

        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def _sample(self) -> None:
        while self._active.wait() and not self._stop.wait(self.interval_s):
            with self._sampling:
                if self._active.is_set():
                    self._peak = max(self._peak, current_rss_bytes())


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the lifetime peak, a weaker stand-in)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
