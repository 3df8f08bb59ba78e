"""The in-process benchmark: every config and peer on the same texts, then rates, ratios and fidelity."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bgeserve.bench.configs import OURS, BenchConfig, MachineFacts, skip_reason
from bgeserve.bench.flops import matmul_shape
from bgeserve.bench.interleave import interleaved_outcomes
from bgeserve.bench.job import Job, JobOutcome, execute, execute_isolated
from bgeserve.bench.measure import MeasureOptions
from bgeserve.bench.runners import RunSettings
from bgeserve.bench.stats import LatencySummary, median, summarize

REFERENCE_CONFIG = BenchConfig("cpu", "fp32")


@dataclass
class Corpus:
    """The texts every row encodes, with their token counts under the model's tokenizer."""

    source: str
    texts: list[str]
    token_counts: list[int]
    query: str
    query_tokens: int
    batch: list[str]
    batch_tokens: int

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)

    def describe(self) -> dict:
        """JSON-ready summary (the texts themselves are left out)."""
        n = len(self.texts)
        return {
            "source": self.source,
            "texts": n,
            "tokens": self.total_tokens,
            "mean_tokens": self.total_tokens / n if n else 0.0,
            "median_tokens": median(self.token_counts) if n else 0.0,
            "max_tokens": max(self.token_counts, default=0),
            "query": self.query,
            "query_tokens": self.query_tokens,
            "batch_texts": len(self.batch),
            "batch_tokens": self.batch_tokens,
        }


def build_corpus(
    source: str,
    lines: list[str],
    count_tokens: Callable[[list[str]], list[int]],
    limit: int | None = None,
    batch_size: int = 32,
    query: str | None = None,
) -> Corpus:
    """Picks the texts (`limit` of them spread evenly over the file), the short query and the batch.

    The default query is the text whose length is closest to 12 tokens, a typical search query.
    """
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"corpus {source} has no non-empty lines")
    texts = spread(texts, limit) if limit else texts
    counts = count_tokens(texts)
    if query is None:
        query = texts[min(range(len(texts)), key=lambda i: abs(counts[i] - 12))]
    batch = spread(texts, batch_size)
    return Corpus(source, texts, counts, query, count_tokens([query])[0], batch, sum(count_tokens(batch)))


def spread(items: list[str], n: int) -> list[str]:
    """`n` items taken at even steps over the list (all of them when n >= len)."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


@dataclass
class RoundResult:
    """One row's figures in one round of a run with several rounds."""

    texts_per_s: float
    query_p50_ms: float | None
    speedup: float | None = None  # against the baseline's texts/s in the same round

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {"texts_per_s": self.texts_per_s, "query_p50_ms": self.query_p50_ms, "speedup": self.speedup}


@dataclass
class Row:
    """One line of the table."""

    config: BenchConfig
    status: str  # ok, skipped, failed
    reason: str | None = None
    texts_per_s: float | None = None
    tokens_per_s: float | None = None
    corpus_seconds: list[float] = field(default_factory=list)
    query_ms: LatencySummary | None = None
    batch_ms: LatencySummary | None = None
    peak_memory_mb: float | None = None
    memory_kind: str | None = None
    load_seconds: float | None = None
    wall_seconds: float | None = None  # the whole row, every round: process start, load, warm-up, timed calls
    speedup: float | None = None
    fidelity: dict[str, float] | None = None
    model_tflops: float | None = None  # tokens/s x projection FLOPs per token (bench.flops)
    device_tflops: float | None = None  # the device's product rate in this precision, where measured
    matmul_use: float | None = None  # model_tflops / device_tflops
    notes: list[str] = field(default_factory=list)
    rounds: list[RoundResult] = field(default_factory=list)
    dense: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def as_dict(self) -> dict:
        """JSON-ready form (vectors left out)."""
        return {
            "config": self.name,
            "kind": self.config.kind,
            "peer": self.config.is_peer,
            "device": self.config.device,
            "dtype": self.config.dtype,
            "threads": self.config.threads,
            "compiled": self.config.compiled,
            "cuda_graphs": self.config.graphs,
            "query_graph": self.config.query_graph,
            "status": self.status,
            "reason": self.reason,
            "texts_per_s": self.texts_per_s,
            "tokens_per_s": self.tokens_per_s,
            "corpus_seconds": self.corpus_seconds,
            "query_latency_ms": self.query_ms.as_dict() if self.query_ms else None,
            "batch_latency_ms": self.batch_ms.as_dict() if self.batch_ms else None,
            "peak_memory_mb": self.peak_memory_mb,
            "memory_kind": self.memory_kind,
            "load_seconds": self.load_seconds,
            "wall_seconds": self.wall_seconds,
            "speedup": self.speedup,
            "fidelity": self.fidelity,
            "model_tflops": self.model_tflops,
            "device_matmul_tflops": self.device_tflops,
            "matmul_use": self.matmul_use,
            "notes": self.notes,
            "rounds": [r.as_dict() for r in self.rounds],
        }


@dataclass
class PairRatio:
    """How many times faster row `a` is than row `b`, taken round by round (above 1: `a` is faster)."""

    a: str
    b: str
    texts_per_s: list[float] = field(default_factory=list)  # a's texts/s over b's, per round
    query_p50: list[float] = field(default_factory=list)  # b's query p50 over a's, per round
    reason: str | None = None  # why there is no ratio (a row skipped or failed)

    def as_dict(self) -> dict:
        """JSON-ready form, with the medians."""
        return {
            "a": self.a,
            "b": self.b,
            "texts_per_s_ratio": median(self.texts_per_s) if self.texts_per_s else None,
            "texts_per_s_ratio_per_round": self.texts_per_s,
            "query_p50_ratio": median(self.query_p50) if self.query_p50 else None,
            "query_p50_ratio_per_round": self.query_p50,
            "reason": self.reason,
        }


def pair_ratios(rows: list[Row], pairs: list[tuple[BenchConfig, BenchConfig]]) -> list[PairRatio]:
    """The ratio of each (a, b) pair of rows, round by round; both must be among `rows`."""
    by_config = {row.config: row for row in rows}
    ratios = []
    for a, b in pairs:
        if a not in by_config or b not in by_config:
            raise ValueError(f"ratio {a.name}/{b.name}: both must be rows of the run")
        ratio = PairRatio(a.name, b.name)
        row_a, row_b = by_config[a], by_config[b]
        not_ok = next((r for r in (row_a, row_b) if r.status != "ok"), None)
        if not_ok is not None:
            ratio.reason = f"{not_ok.name} {not_ok.status}: {not_ok.reason}"
        else:
            for mine, theirs in zip(row_a.rounds, row_b.rounds, strict=True):
                ratio.texts_per_s.append(mine.texts_per_s / theirs.texts_per_s)
                if mine.query_p50_ms and theirs.query_p50_ms:
                    ratio.query_p50.append(theirs.query_p50_ms / mine.query_p50_ms)
        ratios.append(ratio)
    return ratios


@dataclass
class OfflinePlan:
    """What to run and how."""

    configs: list[BenchConfig]
    settings: RunSettings
    options: MeasureOptions
    corpus: Corpus
    baseline: BenchConfig | None = None
    isolate: bool = True  # a fresh process per row
    allow_emulated_bf16: bool = False
    timeout_s: float | None = None
    flops_per_token: float | None = None  # bench.flops.projection_flops_per_token of the model
    # Every row runs once a round, in alternating order: on a machine whose speed drifts, same-round
    # ratios and medians across rounds hold where one pass per row would not.
    rounds: int = 1
    ratios: list[tuple[BenchConfig, BenchConfig]] = field(default_factory=list)  # (a, b): a's speed over b's
    # Every row loaded at once and each phase of a round run row by row (bench.interleave): two rows' figures
    # are then seconds apart, where a row's whole protocol lies between them otherwise.
    interleave: bool = False


@dataclass
class OfflineReport:
    """The rows plus what is needed to read them."""

    rows: list[Row]
    corpus: Corpus
    baseline: str | None
    reference: str | None
    settings: RunSettings
    options: MeasureOptions
    isolated: bool = True
    rounds: int = 1
    ratios: list[PairRatio] = field(default_factory=list)
    interleaved: bool = False


def run_offline(
    plan: OfflinePlan, facts: MachineFacts, progress: Callable[[str], None] = lambda _msg: None
) -> OfflineReport:
    """Runs every row `plan.rounds` times, one after the other (the previous one freed) or, with
    `plan.interleave`, all loaded at once and phase by phase; then ratios, fidelity."""
    count = len(plan.configs)
    reasons = [skip_reason(c, facts, plan.settings.outputs, plan.allow_emulated_bf16) for c in plan.configs]
    for number, (config, reason) in enumerate(zip(plan.configs, reasons, strict=True), 1):
        if reason:
            progress(f"[{number}/{count}] {config.name}: skipped ({reason})")
    if plan.interleave:
        jobs = [None if reason else _job(plan, config) for config, reason in zip(plan.configs, reasons, strict=True)]
        outcomes, walls = interleaved_outcomes(jobs, plan.rounds, plan.timeout_s, progress)
    else:
        outcomes, walls = _row_by_row(plan, reasons, progress)
    rows: list[Row] = []
    for config, reason, outcome_list, wall in zip(plan.configs, reasons, outcomes, walls, strict=True):
        if reason:
            rows.append(Row(config, "skipped", reason))
            continue
        row = _row(config, outcome_list, plan.corpus, plan.flops_per_token, plan.rounds)
        row.wall_seconds = wall
        rows.append(row)

    reference = _reference_vectors(plan, rows, progress)
    for row in rows:
        if row.status == "ok" and reference is not None:
            assert row.dense is not None  # a measurement keeps its corpus vectors (run_protocol)
            row.fidelity = fidelity(row.dense, reference[1])
    if reference is not None:
        for row in rows:
            if row.name == reference[0]:
                row.notes.append("fidelity reference")
    baseline = plan.baseline or next((r.config for r in rows if r.status == "ok"), None)
    _fill_speedups(rows, baseline)
    return OfflineReport(
        rows=rows,
        corpus=plan.corpus,
        baseline=baseline.name if baseline else None,
        reference=reference[0] if reference else None,
        settings=plan.settings,
        options=plan.options,
        isolated=plan.isolate,
        rounds=plan.rounds,
        ratios=pair_ratios(rows, plan.ratios),
        interleaved=plan.interleave,
    )


def _row_by_row(
    plan: OfflinePlan, reasons: list[str | None], progress: Callable[[str], None]
) -> tuple[list[list[JobOutcome]], list[float]]:
    """Each row's whole protocol in turn, round after round in alternating order: its outcome in each round it
    ran, and the wall seconds it took."""
    count = len(plan.configs)
    outcomes: list[list[JobOutcome]] = [[] for _ in plan.configs]
    walls = [0.0] * count
    for round_index in range(plan.rounds):
        prefix = f"round {round_index + 1}/{plan.rounds} " if plan.rounds > 1 else ""
        order = range(count) if round_index % 2 == 0 else reversed(range(count))
        for i in order:
            config = plan.configs[i]
            if reasons[i] or not all(_succeeded(o) for o in outcomes[i]):
                continue  # skipped, or failed in an earlier round: that already decides the row
            progress(f"{prefix}[{i + 1}/{count}] {config.name}: running")
            started = time.perf_counter()
            outcome = _run(plan, config, plan.options)
            walls[i] += time.perf_counter() - started
            outcomes[i].append(outcome)
            progress(f"{prefix}[{i + 1}/{count}] {config.name}: {_outcome_line(outcome, len(plan.corpus.texts))}")
    return outcomes, walls


def _succeeded(outcome: JobOutcome) -> bool:
    return outcome.status == "ok" and outcome.measurement is not None


def _outcome_line(outcome: JobOutcome, texts: int) -> str:
    m = outcome.measurement
    if _succeeded(outcome) and m is not None and m.corpus_seconds:
        return f"{texts / median(m.corpus_seconds):.2f} texts/s"
    return f"{outcome.status} ({outcome.reason})"


def _job(plan: OfflinePlan, config: BenchConfig) -> Job:
    return Job(config.name, plan.settings, plan.options, plan.corpus.texts, plan.corpus.query, plan.corpus.batch)


def _run(plan: OfflinePlan, config: BenchConfig, options: MeasureOptions) -> JobOutcome:
    job = dataclasses.replace(_job(plan, config), options=options)
    # A row of another interpreter (openvino) cannot run in this process, --inline or not.
    isolate = plan.isolate or config.own_interpreter
    return execute_isolated(job, plan.timeout_s) if isolate else execute(job)


def _row(
    config: BenchConfig, outcomes: list[JobOutcome], corpus: Corpus, flops_per_token: float | None, rounds: int
) -> Row:
    """The row of one config from its outcome in each round: a round that did not succeed fails the row."""
    for number, outcome in enumerate(outcomes, 1):
        if not _succeeded(outcome):
            where = f"round {number} of {rounds}: " if rounds > 1 else ""
            return Row(config, outcome.status, f"{where}{outcome.reason}")
    measurements = [o.measurement for o in outcomes if o.measurement is not None]
    row = Row(config, "ok")
    round_seconds = [median(m.corpus_seconds) for m in measurements]
    seconds = median(round_seconds)
    row.texts_per_s = len(corpus.texts) / seconds
    row.tokens_per_s = corpus.total_tokens / seconds
    row.corpus_seconds = [s for m in measurements for s in m.corpus_seconds]
    row.query_ms = summarize([t for m in measurements for t in m.query_ms])
    row.batch_ms = summarize([t for m in measurements for t in m.batch_ms])
    row.rounds = [
        RoundResult(len(corpus.texts) / s, median(m.query_ms) if m.query_ms else None)
        for m, s in zip(measurements, round_seconds, strict=True)
    ]
    peaks = [m.peak_memory_bytes for m in measurements if m.peak_memory_bytes is not None]
    if peaks:
        row.peak_memory_mb = max(peaks) / 2**20
    row.memory_kind = measurements[0].memory_kind
    row.load_seconds = median([m.load_seconds for m in measurements])
    row.dense = measurements[-1].dense
    # What a library reports it ran is the same each round; a round's own warning is kept too.
    row.notes += list(dict.fromkeys(note for m in measurements for note in m.notes))
    rates = [m.matmul_tflops for m in measurements if m.matmul_tflops]
    if flops_per_token:
        row.model_tflops = row.tokens_per_s * flops_per_token / 1e12
        if rates:
            tflops = median(rates)
            row.device_tflops = tflops
            row.matmul_use = row.model_tflops / tflops
            rate = f"{tflops:,.0f} TFLOP/s" if tflops >= 10 else f"{tflops * 1e3:,.0f} GFLOP/s"
            row.notes.append(f"matmul use {row.matmul_use:.0%} of {rate} "
                             f"({config.dtype} {matmul_shape(config.device)} product here)")
    return row


def _reference_vectors(
    plan: OfflinePlan, rows: list[Row], progress: Callable[[str], None]
) -> tuple[str, np.ndarray] | None:
    """Our fp32 vectors of the corpus: from an fp32 row of the run, else from one extra untimed pass."""
    for row in rows:
        if row.status == "ok" and row.config.kind in OURS and row.config.dtype == "fp32":
            assert row.dense is not None
            return row.name, row.dense
    if not any(r.status == "ok" for r in rows):
        return None
    progress(f"{REFERENCE_CONFIG.name}: untimed reference pass for the fidelity column")
    untimed = MeasureOptions(repeats=1, query_runs=0, batch_runs=0, warmup=False)
    outcome = _run(plan, REFERENCE_CONFIG, untimed)
    if outcome.status != "ok" or outcome.measurement is None:
        return None
    assert outcome.measurement.dense is not None
    return f"{REFERENCE_CONFIG.name} (untimed)", outcome.measurement.dense


def fidelity(dense: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How close a row's dense vectors are to our fp32 ones, text by text.

    `min_cosine_centred` subtracts the reference's mean vector from both first: on random weights every
    text's vector leans toward one common direction, which makes plain cosine look better than it is.
    """
    a = np.asarray(dense, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"vectors of shape {a.shape} cannot be compared with the reference's {b.shape}")
    cos = _cosines(a, b)
    mean = b.mean(axis=0, keepdims=True)
    centred = _cosines(a - mean, b - mean)
    return {
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(np.abs(a - b).max()),
        "min_cosine_centred": float(centred.min()),
    }


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return (a * b).sum(axis=1) / norms


def _fill_speedups(rows: list[Row], baseline: BenchConfig | None) -> None:
    base = next((r for r in rows if baseline is not None and r.config == baseline), None)
    if base is None:
        return
    if base.status != "ok" or not base.texts_per_s:
        base.notes.append(f"baseline ({base.status}): no speed-ups")
        return
    base.notes.append("baseline")
    for row in rows:
        if row.status != "ok" or not row.texts_per_s:
            continue
        # Each round's ratio is taken within that round (the machine's speed of that moment cancels out);
        # the row's speed-up is their median. With one round this is the plain ratio.
        for mine, theirs in zip(row.rounds, base.rounds, strict=True):
            mine.speedup = mine.texts_per_s / theirs.texts_per_s
        row.speedup = median([r.speedup for r in row.rounds if r.speedup is not None])
