"""One benchmark row, run in this process or in a fresh one (`python -m bgeserve.bench.job JOB_DIR`).

A fresh process per row is the default: torch's thread count and allocator are process-wide, and the
resident-memory peak of a row is only its own when nothing else was loaded before it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bgeserve.bench.configs import BenchConfig, parse_config
from bgeserve.bench.flops import measure_matmul_tflops
from bgeserve.bench.measure import Measurement, MeasureOptions, PeakMemory, run_protocol
from bgeserve.bench.runners import ConfigUnavailable, RunSettings, open_encoder


@dataclass
class JobOutcome:
    """What one row produced: a measurement, or the reason it was skipped or failed."""

    status: str  # "ok", "skipped" or "failed"
    reason: str | None = None
    measurement: Measurement | None = None


@dataclass(frozen=True)
class Job:
    """Everything a row needs, JSON-serialisable so a child process can receive it."""

    config: str
    settings: RunSettings
    options: MeasureOptions
    texts: list[str]
    query: str
    batch: list[str]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Job:
        raw = json.loads(text)
        raw["settings"] = RunSettings(**raw["settings"])
        raw["options"] = MeasureOptions(**raw["options"])
        return cls(**raw)


def execute(job: Job) -> JobOutcome:
    """Loads the row's model, runs the timing protocol, frees the model; never raises for a row's failure."""
    config = parse_config(job.config)
    # Every row needs torch (the peers through transformers): import it first, so the memory column
    # counts what the row itself loads (its model, activations, other libraries), not torch's own ~200 MB.
    import torch  # noqa: F401

    memory = PeakMemory(config.device)
    encode = None
    try:
        memory.start()
        started = time.perf_counter()
        encode = open_encoder(config, job.settings)
        load_seconds = time.perf_counter() - started
        measurement = run_protocol(encode, job.texts, job.query, job.batch, job.options)
        measurement.load_seconds = load_seconds
        measurement.notes = list(getattr(encode, "notes", []))  # what the peer reports it ran (openvino)
        measurement.peak_memory_bytes = memory.stop()
        measurement.memory_kind = memory.kind
        # After the peak-memory reading: the product's operands are not the row's memory.
        measurement.matmul_tflops = row_matmul_rate(config)
        return JobOutcome("ok", measurement=measurement)
    except Exception as exc:  # noqa: BLE001 - one row failing must not lose the others' numbers
        return outcome_of_error(exc)
    finally:
        if memory.kind == "rss":
            memory.stop()  # idempotent: ends the sampling thread on the failure paths too
        del encode
        _free(config)


def outcome_of_error(exc: Exception) -> JobOutcome:
    """A row's error as its outcome: skipped where this machine cannot run it, failed otherwise."""
    if isinstance(exc, ConfigUnavailable):
        return JobOutcome("skipped", reason=str(exc))
    return JobOutcome("failed", reason=f"{type(exc).__name__}: {exc}")


def row_matmul_rate(config: BenchConfig) -> float | None:
    """The device's product rate in the row's precision, for CUDA rows and our torch CPU rows (there the rate
    is that of our backend's kernel on the row's threads); None for the others."""
    if config.device.startswith("cuda") or config.kind == "cpu":
        return measure_matmul_tflops(config.device, config.dtype)
    return None


def _free(config: BenchConfig) -> None:
    gc.collect()
    if config.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def interpreter(job: Job) -> str:
    """The Python that runs `job`: this one, or `--openvino-python` for the openvino rows."""
    if parse_config(job.config).own_interpreter:
        if not job.settings.openvino_python:
            raise ValueError(f"{job.config} needs settings.openvino_python (scripts/openvino_venv.sh)")
        return job.settings.openvino_python
    return sys.executable


def execute_isolated(job: Job, timeout_s: float | None = None) -> JobOutcome:
    """Runs `job` in a fresh Python process (of `interpreter(job)`) and reads its outcome back."""
    with tempfile.TemporaryDirectory(prefix="bgeserve-bench-") as tmp:
        folder = Path(tmp)
        (folder / "job.json").write_text(job.to_json(), encoding="utf-8")
        # The peers' progress bars would only clutter the captured output.
        env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        try:
            proc = subprocess.run(
                [interpreter(job), "-m", "bgeserve.bench.job", str(folder)],
                capture_output=True, text=True, timeout=timeout_s, env=env, check=False,
            )
        except subprocess.TimeoutExpired:
            return JobOutcome("failed", reason=f"did not finish within {timeout_s:g} s (--timeout)")
        result_file = folder / "result.json"
        if proc.returncode != 0 or not result_file.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            return JobOutcome("failed", reason=f"worker process exited with {proc.returncode}: {tail[0]}")
        return _read_outcome(folder)


def _write_outcome(folder: Path, outcome: JobOutcome) -> None:
    data: dict = {"status": outcome.status, "reason": outcome.reason, "measurement": None}
    if outcome.measurement is not None:
        m = dataclasses.asdict(dataclasses.replace(outcome.measurement, dense=None))
        data["measurement"] = m
        if outcome.measurement.dense is not None:
            np.save(folder / "dense.npy", outcome.measurement.dense)
    (folder / "result.json").write_text(json.dumps(data), encoding="utf-8")


def _read_outcome(folder: Path) -> JobOutcome:
    data = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    measurement = None
    if data["measurement"] is not None:
        measurement = Measurement(**data["measurement"])
        dense_file = folder / "dense.npy"
        if dense_file.exists():
            measurement.dense = np.load(dense_file)
    return JobOutcome(data["status"], data["reason"], measurement)


def read_job_folder(argv: list[str] | None, module: str) -> tuple[Path, Job] | None:
    """A child-process entry's JOB_DIR argument and the job in its job.json; None, after a usage line on
    stderr, without exactly one argument."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m {module} JOB_DIR", file=sys.stderr)
        return None
    folder = Path(args[0])
    return folder, Job.from_json((folder / "job.json").read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: reads JOB_DIR/job.json, writes JOB_DIR/result.json (+ dense.npy)."""
    given = read_job_folder(argv, "bgeserve.bench.job")
    if given is None:
        return 2
    folder, job = given
    _write_outcome(folder, execute(job))
    return 0


if __name__ == "__main__":
    sys.exit(main())
