"""A row kept loaded in its own process, measuring one phase of the protocol at a time on command.

`bgeserve bench --interleave` loads every row this way, then runs each phase (the query calls, the batch
calls, each corpus pass) row by row. On a machine whose speed drifts over tens of seconds (a shared VM),
the phases of two rows are then seconds apart, not a whole row's protocol apart.

The exchange is one JSON line each way: the parent writes a command to the child's stdin, the child answers
on the stdout it was started with. What a library prints goes to stderr, which the parent keeps in a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from bgeserve.bench.configs import BenchConfig, parse_config
from bgeserve.bench.job import Job, JobOutcome, interpreter, outcome_of_error, read_job_folder, row_matmul_rate
from bgeserve.bench.measure import (
    Measurement,
    PeakMemory,
    timed_calls,
    timed_pass,
    warm_up,
)
from bgeserve.bench.runners import open_encoder
from bgeserve.runtime.memory import release_freed_memory

PHASES = ("query", "batch", "pass", "matmul")


class RowFailed(Exception):
    """The row cannot go on: its reason is the row's."""


def serve(job: Job, folder: Path, commands: IO[str], replies: IO[str]) -> None:
    """Child side: loads the row (and warms it up), answers "ready", then one reply per command until
    "finish" (which writes the corpus vectors to folder/dense.npy) or the end of `commands`."""
    config = parse_config(job.config)
    import torch  # noqa: F401 - imported before loading, as in job.execute, so the memory column is the row's

    def reply(status: str, **fields: Any) -> None:
        replies.write(json.dumps({"status": status, **fields}) + "\n")
        replies.flush()

    memory = PeakMemory(config.device)
    memory.start()
    try:
        _load_and_answer(job, folder, config, memory, commands, reply)
    finally:
        memory.stop()


def _load_and_answer(job: Job, folder: Path, config: BenchConfig, memory: PeakMemory, commands: IO[str],
                     reply: Callable[..., None]) -> None:
    """serve's work between the memory sampler's start and stop: load, then answer command by command."""
    try:
        started = time.perf_counter()
        encode = open_encoder(config, job.settings)
        load_seconds = time.perf_counter() - started
        if job.options.warmup:
            warm_up(encode, job.query, job.batch)
    except Exception as exc:  # noqa: BLE001 - the row's failure, reported, not the worker's crash
        outcome = outcome_of_error(exc)
        return reply(outcome.status, reason=outcome.reason)
    reply("ready")
    dense: np.ndarray | None = None
    memory.pause()
    for line in commands:
        command = line.strip()
        memory.resume()
        try:
            if command == "query":
                reply("ok", values=timed_calls(encode, [job.query], job.options.query_runs))
            elif command == "batch":
                reply("ok", values=timed_calls(encode, job.batch, job.options.batch_runs))
            elif command == "pass":
                seconds, dense = timed_pass(encode, job.texts)
                reply("ok", values=[seconds])
            elif command == "matmul":
                memory.pause()  # the product's operands are not the row's memory
                rate = row_matmul_rate(config)
                release_freed_memory()  # nor is what the heap would keep of them for the next rounds
                reply("ok", values=[] if rate is None else [rate])
            elif command == "finish":
                peak = memory.stop()
                if dense is not None:
                    np.save(folder / "dense.npy", dense)
                return reply("ok", load_seconds=load_seconds, peak_memory_bytes=peak, memory_kind=memory.kind,
                             notes=list(getattr(encode, "notes", [])))
            else:
                return reply("failed", reason=f"unknown command {command!r}")
        except Exception as exc:  # noqa: BLE001
            return reply("failed", reason=f"{type(exc).__name__}: {exc}")
        memory.pause()


class RowProcess:
    """Parent side: one row's worker process. Every exchange waits at most `timeout_s` (None: no limit)."""

    def __init__(self, job: Job, folder: Path, timeout_s: float | None = None) -> None:
        self.job = job
        self.folder = folder
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None

    def start(self) -> JobOutcome | None:
        """Starts and loads the row: None once it is ready, else its skipped or failed outcome."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "job.json").write_text(self.job.to_json(), encoding="utf-8")
        self._stderr = open(self.folder / "stderr.txt", "w+", encoding="utf-8")  # noqa: SIM115 - closed in close()
        # The peers' progress bars would only clutter the captured output.
        env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self._proc = subprocess.Popen(
            [interpreter(self.job), "-m", "bgeserve.bench.worker", str(self.folder)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env,
        )
        try:
            answer = self._answer()
        except RowFailed as exc:
            self.close()
            return JobOutcome("failed", reason=str(exc))
        if answer["status"] != "ready":
            self.close()
            return JobOutcome(answer["status"], reason=answer.get("reason"))
        return None

    def run(self, phase: str) -> list[float]:
        """What one phase (`PHASES`) measured: milliseconds per call, the seconds of one corpus pass, or the
        device's product rate in TFLOP/s (none for a row without one: bench.job.row_matmul_rate)."""
        return self._ask(phase)["values"]

    def finish(self) -> Measurement:
        """Ends the row: its load time, peak memory, notes and last pass's vectors."""
        answer = self._ask("finish")
        self.close()
        dense_file = self.folder / "dense.npy"
        return Measurement(
            load_seconds=answer["load_seconds"], peak_memory_bytes=answer["peak_memory_bytes"],
            memory_kind=answer["memory_kind"], notes=answer["notes"],
            dense=np.load(dense_file) if dense_file.exists() else None,
        )

    def close(self) -> None:
        """Stops the process (if it still runs) and closes its files; safe to call twice."""
        if self._proc is not None:
            if self._proc.stdin is not None:
                # A worker at its end of input exits by itself. One that died with a command unsent in the
                # buffer cannot be told anything any more.
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _ask(self, command: str) -> dict:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise RowFailed("the row's worker is not running")
        try:
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # it exited: _answer says how
        try:
            answer = self._answer()
        except RowFailed:
            self.close()
            raise
        if answer["status"] != "ok":
            self.close()
            raise RowFailed(answer.get("reason") or answer["status"])
        return answer

    def _answer(self) -> dict:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], self.timeout_s)
        if not ready:
            self.close()
            raise RowFailed(f"did not answer within {self.timeout_s:g} s (--timeout)")
        line = proc.stdout.readline()
        if not line:
            code = proc.wait()
            raise RowFailed(f"worker process exited with {code}: {self._last_stderr_line()}")
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict) or "status" not in answer:
            raise RowFailed(f"the row's worker answered {line.strip()[:80]!r}, not a reply")
        return answer

    def _last_stderr_line(self) -> str:
        if self._stderr is None:
            return "no output"
        self._stderr.flush()
        self._stderr.seek(0)
        lines = self._stderr.read().strip().splitlines()
        return lines[-1] if lines else "no output"


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: serves JOB_DIR/job.json's row on stdin/stdout."""
    given = read_job_folder(argv, "bgeserve.bench.worker")
    if given is None:
        return 2
    folder, job = given
    # Replies keep the stdout the parent reads; anything printed from here on (libraries too) goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(job, folder, sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
