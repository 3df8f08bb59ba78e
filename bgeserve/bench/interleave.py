"""The interleaved protocol: every row loaded at once, each phase of each round run row by row.

A round is the query calls, the batch calls, each corpus pass and the product rate, every one of them a
phase that all rows run in turn, in alternating order (1-2-3, then 3-2-1, ...; the next round starts the
other way) so that no row is always first. The rows load (and warm up) once, one after the other, so that
a row's load time is its own; their processes then wait, idle, for their turn.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from bgeserve.bench.job import Job, JobOutcome
from bgeserve.bench.measure import Measurement
from bgeserve.bench.stats import median
from bgeserve.bench.worker import RowFailed, RowProcess


class LoadedRow(Protocol):
    """What the protocol needs of a loaded row (worker.RowProcess; the tests script one)."""

    def start(self) -> JobOutcome | None: ...
    def run(self, phase: str) -> list[float]: ...
    def finish(self) -> Measurement: ...
    def close(self) -> None: ...


OpenRow = Callable[[Job, Path, float | None], LoadedRow]
T = TypeVar("T")

# A row's runtime may keep its threads spinning for a moment after a call (onnxruntime's do, ~50 ms): the
# next row waits that out, so that it does not share the cores with the one before.
SETTLE_S = 0.1


def phases(job: Job) -> list[str]:
    """A round's phases: the query calls and the batch calls (where asked), each corpus pass, then the
    device's product rate (for the rows that report one), so that the rate is of the round's moment too."""
    options = job.options
    asked = [name for name, runs in (("query", options.query_runs), ("batch", options.batch_runs)) if runs > 0]
    return asked + ["pass"] * max(1, options.repeats) + ["matmul"]


def interleaved_outcomes(
    jobs: list[Job | None],
    rounds: int,
    timeout_s: float | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
    open_row: OpenRow = RowProcess,
    settle_s: float = SETTLE_S,
) -> tuple[list[list[JobOutcome]], list[float]]:
    """Each job's outcome in each round it ran (a row that fails stops there) and the wall seconds it took;
    a None job (a skipped row) runs nowhere."""
    count = len(jobs)
    outcomes: list[list[JobOutcome]] = [[] for _ in jobs]
    walls = [0.0] * count
    present = [job for job in jobs if job is not None]
    if not present:
        return outcomes, walls
    round_phases = phases(present[0])  # the options are the plan's, the same for every row
    loaded: dict[int, LoadedRow] = {}

    def label(i: int) -> str:
        job = jobs[i]
        assert job is not None
        return f"[{i + 1}/{count}] {job.config}"

    def timed(i: int, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return call()
        finally:
            walls[i] += time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="bgeserve-bench-") as tmp:
        try:
            for i, job in enumerate(jobs):
                if job is None:
                    continue
                progress(f"{label(i)}: loading")
                # In `loaded` before it starts: the finally below stops it whatever happens on the way.
                row = loaded[i] = open_row(job, Path(tmp) / f"row-{i}", timeout_s)
                failure = timed(i, row.start)
                if failure is not None:
                    loaded.pop(i).close()
                    outcomes[i].append(failure)
                    progress(f"{label(i)}: {failure.status} ({failure.reason})")
            for round_index in range(rounds):
                prefix = f"round {round_index + 1}/{rounds} " if rounds > 1 else ""
                taken = {i: Measurement() for i in loaded}
                for phase_index, phase in enumerate(round_phases):
                    # By phase, and by round too: with an even count of phases a round would start as the last did.
                    order = sorted(loaded, reverse=(round_index + phase_index) % 2 == 1)
                    for i in order:
                        time.sleep(settle_s)
                        try:
                            _record(taken[i], phase, timed(i, functools.partial(loaded[i].run, phase)))
                        except RowFailed as exc:
                            outcomes[i].append(JobOutcome("failed", reason=str(exc)))
                            progress(f"{prefix}{label(i)}: failed ({exc})")
                            loaded.pop(i).close()
                for i in sorted(loaded):
                    outcomes[i].append(JobOutcome("ok", measurement=taken[i]))
                    rate = len(present[0].texts) / median(taken[i].corpus_seconds)  # every row: the same texts
                    progress(f"{prefix}{label(i)}: {rate:.2f} texts/s")
            for i in sorted(loaded):
                try:
                    final = timed(i, loaded[i].finish)
                except RowFailed as exc:
                    # Every round measured; the row still fails, as any row that does not end cleanly.
                    outcomes[i][-1] = JobOutcome("failed", reason=f"at its end: {exc}")
                    continue
                finally:
                    loaded.pop(i).close()
                _merge_final(outcomes[i], final)
        finally:
            for row in loaded.values():
                row.close()
    return outcomes, walls


def _record(measurement: Measurement, phase: str, values: list[float]) -> None:
    if phase == "query":
        measurement.query_ms += values
    elif phase == "batch":
        measurement.batch_ms += values
    elif phase == "pass":
        measurement.corpus_seconds += values
    else:
        measurement.matmul_tflops = values[0] if values else None


def _merge_final(outcomes: list[JobOutcome], final: Measurement) -> None:
    """What a row reports once, at its end, goes with its rounds: the load time with each of them, the
    memory peak, notes and vectors with the last."""
    for outcome in outcomes:
        assert outcome.measurement is not None
        outcome.measurement.load_seconds = final.load_seconds
    last = outcomes[-1].measurement
    assert last is not None
    last.peak_memory_bytes, last.memory_kind = final.peak_memory_bytes, final.memory_kind
    last.notes, last.dense = final.notes, final.dense
