"""`bgeserve bench --interleave`: rows loaded side by side, each phase of a round run row by row."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bgeserve.bench import worker
from bgeserve.bench.interleave import interleaved_outcomes, phases
from bgeserve.bench.job import Job, JobOutcome
from bgeserve.bench.measure import Measurement, MeasureOptions, PeakMemory
from bgeserve.bench.runners import RunSettings
from bgeserve.bench.worker import RowFailed, RowProcess, serve
from bgeserve.cli import main

FAST = ["--repeats", "2", "--query-runs", "3", "--batch-runs", "2", "--batch", "4"]


def _job(config: str, options: MeasureOptions | None = None, **settings) -> Job:
    return Job(config, RunSettings("m", **settings), options or MeasureOptions(repeats=2, query_runs=2, batch_runs=1),
               ["a", "b"], "a", ["a"])


class ScriptedRow:
    """A loaded row whose timings come from a shared clock: every phase takes `cost` times the machine's
    slowness at that moment, which drifts from phase to phase."""

    def __init__(self, name: str, cost: float, log: list[str], slowness: list[float], fail_at: str | None = None,
                 load: JobOutcome | None = None) -> None:
        self.name, self.cost, self.log, self.slowness = name, cost, log, slowness
        self.fail_at, self.load, self.closed = fail_at, load, False

    def start(self) -> JobOutcome | None:
        return self.load

    def run(self, phase: str) -> list[float]:
        self.log.append(f"{self.name}:{phase}")
        if self.fail_at == f"{phase}#{sum(e == f'{self.name}:{phase}' for e in self.log)}":
            raise RowFailed("out of memory")
        now = self.slowness[(len(self.log) - 1) // 2 % len(self.slowness)]  # a phase's two rows: one moment
        return [self.cost * now]

    def finish(self) -> Measurement:
        self.log.append(f"{self.name}:finish")
        return Measurement(load_seconds=7.0, peak_memory_bytes=123, notes=[f"{self.name} ran"],
                           dense=np.eye(2, 4, dtype=np.float32))

    def close(self) -> None:
        self.closed = True


def _scripted(rows: dict[str, ScriptedRow]):
    def open_row(job: Job, folder: Path, timeout_s: float | None) -> ScriptedRow:
        assert timeout_s == 30.0
        return rows[job.config]
    return open_row


def test_each_phase_runs_row_by_row_in_alternating_order():
    log: list[str] = []
    slowness = [1.0, 3.0, 1.5, 0.5, 2.0, 1.2, 0.8]  # the machine drifts from phase to phase
    rows = {name: ScriptedRow(name, cost, log, slowness) for name, cost in (("cpu-fp32", 2.0), ("cpu-int8", 1.0))}
    jobs = [_job("cpu-fp32"), None, _job("cpu-int8")]  # the None row was skipped: it runs nowhere
    outcomes, walls = interleaved_outcomes(jobs, rounds=2, timeout_s=30.0, open_row=_scripted(rows), settle_s=0)
    round_phases = ["query", "batch", "pass", "pass", "matmul"]
    assert phases(jobs[0]) == round_phases
    expected: list[str] = []
    for step, phase in enumerate(round_phases * 2):
        pair = [f"cpu-fp32:{phase}", f"cpu-int8:{phase}"]
        expected += pair if step % 2 == 0 else pair[::-1]
    assert log == expected + ["cpu-fp32:finish", "cpu-int8:finish"]
    assert outcomes[1] == [] and walls[1] == 0.0 and walls[0] > 0.0
    fp32, int8 = outcomes[0], outcomes[2]
    assert [o.status for o in fp32 + int8] == ["ok"] * 4
    # Each phase's two rows ran at the same moment: every ratio is the true 2x, however the machine drifted.
    for a, b in zip(fp32, int8, strict=True):
        assert a.measurement.query_ms == [2 * t for t in b.measurement.query_ms]
        assert len(a.measurement.query_ms) == 1 and len(a.measurement.corpus_seconds) == 2
        assert a.measurement.corpus_seconds == [2 * t for t in b.measurement.corpus_seconds]
        assert a.measurement.matmul_tflops == 2 * b.measurement.matmul_tflops  # each round has its own rate
    assert fp32[0].measurement.corpus_seconds != fp32[1].measurement.corpus_seconds  # the drift is there
    # What a row reports at its end: the load time goes with every round, the rest with the last.
    assert [o.measurement.load_seconds for o in fp32] == [7.0, 7.0]
    assert fp32[0].measurement.dense is None and fp32[1].measurement.dense is not None
    assert fp32[1].measurement.peak_memory_bytes == 123 and fp32[1].measurement.notes == ["cpu-fp32 ran"]


def test_a_row_that_fails_stops_there_and_the_others_go_on():
    log: list[str] = []
    rows = {
        "cpu-fp32": ScriptedRow("cpu-fp32", 1.0, log, [1.0]),
        "cpu-int8": ScriptedRow("cpu-int8", 1.0, log, [1.0], fail_at="pass#3"),  # its first pass of round 2
        "onnx-int8": ScriptedRow("onnx-int8", 1.0, log, [1.0], load=JobOutcome("skipped", "no onnxruntime")),
    }
    jobs = [_job("cpu-fp32"), _job("cpu-int8"), _job("onnx-int8")]
    messages: list[str] = []
    outcomes, _ = interleaved_outcomes(jobs, rounds=3, timeout_s=30.0, progress=messages.append,
                                       open_row=_scripted(rows), settle_s=0)
    assert [o.status for o in outcomes[0]] == ["ok"] * 3
    assert [o.status for o in outcomes[1]] == ["ok", "failed"] and outcomes[1][1].reason == "out of memory"
    assert outcomes[2] == [JobOutcome("skipped", "no onnxruntime")]
    assert not any(e.startswith("onnx-int8:") for e in log)
    assert sum(e.startswith("cpu-int8:") for e in log) == 5 + 3  # round 1, then round 2 up to its failure
    assert "cpu-int8:finish" not in log and rows["cpu-int8"].closed
    assert "round 2/3 [2/3] cpu-int8: failed (out of memory)" in messages
    assert "[3/3] onnx-int8: skipped (no onnxruntime)" in messages


def test_the_worker_answers_each_phase_and_its_end(tiny_m3, tmp_path, monkeypatch):
    job = Job("cpu-fp32", RunSettings(str(tiny_m3)), MeasureOptions(repeats=1, query_runs=3, batch_runs=2),
              ["one text", "another text"], "a query", ["one text"])
    calls: list[str] = []

    class RecordedMemory(PeakMemory):  # what the memory sampler is told, in order
        def pause(self) -> None:
            calls.append("pause")
            super().pause()

        def resume(self) -> None:
            calls.append("resume")
            super().resume()

    monkeypatch.setattr(worker, "PeakMemory", RecordedMemory)
    replies = io.StringIO()
    serve(job, tmp_path, io.StringIO("query\nbatch\npass\nmatmul\nfinish\n"), replies)
    answers = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert [a["status"] for a in answers] == ["ready", "ok", "ok", "ok", "ok", "ok"]
    # It samples only while it works, and not while it times the product (its operands are not the row's).
    assert calls == ["pause"] + ["resume", "pause"] * 3 + ["resume", "pause", "pause", "resume"]
    assert [len(a["values"]) for a in answers[1:4]] == [3, 2, 1]
    assert answers[4]["values"][0] > 0  # TFLOP/s of the row's product
    end = answers[5]
    assert end["load_seconds"] > 0 and end["memory_kind"] == "rss"
    assert np.load(tmp_path / "dense.npy").shape[0] == 2

    replies = io.StringIO()
    serve(job, tmp_path, io.StringIO("pass\nsing\nquery\n"), replies)
    answers = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert [a["status"] for a in answers] == ["ready", "ok", "failed"]  # nothing after the failure
    assert answers[2]["reason"] == "unknown command 'sing'"

    replies = io.StringIO()
    serve(dataclass_replace(job, settings=RunSettings(str(tmp_path / "nothing"))), tmp_path, io.StringIO(""), replies)
    (answer,) = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert answer["status"] == "failed" and "nothing" in answer["reason"]


def dataclass_replace(job: Job, **changes) -> Job:
    import dataclasses

    return dataclasses.replace(job, **changes)


def _fake_interpreter(tmp_path: Path, body: str) -> str:
    """An executable that stands in for the openvino rows' Python (the one row kind with its own interpreter)."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\n{body}\n", encoding="utf-8")
    script.chmod(0o755)
    return str(script)


def test_a_worker_that_dies_or_hangs_fails_its_row_with_the_reason(tmp_path):
    dying = _job("openvino-bf16", openvino_python=_fake_interpreter(tmp_path, "import sys; sys.exit('no openvino')"))
    outcome = RowProcess(dying, tmp_path / "dying", timeout_s=30).start()
    assert outcome == JobOutcome("failed", "worker process exited with 1: no openvino")

    hanging = _job("openvino-bf16", openvino_python=_fake_interpreter(tmp_path, "import time; time.sleep(60)"))
    row = RowProcess(hanging, tmp_path / "hanging", timeout_s=0.5)
    started = time.perf_counter()
    outcome = row.start()
    assert outcome == JobOutcome("failed", "did not answer within 0.5 s (--timeout)")
    assert time.perf_counter() - started < 10 and row._proc is None  # killed, not left behind

    # A worker that loads, then dies in a phase: the phase fails with the worker's last words.
    body = ("import sys; print('{\"status\": \"ready\"}', flush=True); sys.stdin.readline(); "
            "sys.exit('killed by the kernel')")
    row = RowProcess(_job("openvino-bf16", openvino_python=_fake_interpreter(tmp_path, body)), tmp_path / "w", 30)
    assert row.start() is None
    with pytest.raises(RowFailed, match="worker process exited with 1: killed by the kernel"):
        row.run("pass")
    row.close()


def test_a_paused_sampler_reads_nothing():
    memory = PeakMemory(interval_s=0.001)
    memory.start()
    memory.pause()
    block = b"\x01" * (256 * 2**20)  # written: resident while it lives
    time.sleep(0.2)
    del block
    memory.resume()
    assert memory.stop() < 128 * 2**20

    memory = PeakMemory(interval_s=0.001)  # the same without the pause sees it
    memory.start()
    block = b"\x01" * (256 * 2**20)
    time.sleep(0.2)
    del block
    assert memory.stop() >= 256 * 2**20


def _bench(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["bench", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_interleave_from_the_command_line(tiny_m3, corpus_file, capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    code, out, err = _bench(capsys, "--model", str(tiny_m3), "--corpus", str(corpus_file), *FAST,
                            "--configs", "cpu-fp32,cpu-int8", "--interleave", "--rounds", "2",
                            "--ratios", "cpu-int8/cpu-fp32", "--json", str(out_json))
    assert code == 0
    lines = err.splitlines()
    assert lines.index("[1/2] cpu-fp32: loading") < lines.index("[2/2] cpu-int8: loading")
    assert [line.split(":")[0] for line in lines if line.startswith("round ")] == [
        "round 1/2 [1/2] cpu-fp32", "round 1/2 [2/2] cpu-int8", "round 2/2 [1/2] cpu-fp32", "round 2/2 [2/2] cpu-int8"]
    assert "every row loaded at once, each in its own process" in out
    doc = json.loads(out_json.read_text(encoding="utf-8"))
    assert doc["protocol"]["interleaved"] is True and doc["protocol"]["rounds"] == 2
    rows = {r["config"]: r for r in doc["rows"]}
    for name in ("cpu-fp32", "cpu-int8"):
        assert rows[name]["status"] == "ok" and len(rows[name]["rounds"]) == 2
        assert len(rows[name]["corpus_seconds"]) == 4 and rows[name]["peak_memory_mb"] > 0
    assert rows["cpu-int8"]["fidelity"]["min_cosine"] > 0.9  # the vectors came back from its process
    assert len(doc["ratios"][0]["texts_per_s_ratio_per_round"]) == 2

    code, _, err = _bench(capsys, "--model", str(tiny_m3), "--corpus", str(corpus_file), "--interleave", "--inline")
    assert code == 2 and "--interleave keeps every row in a process of its own" in err
