"""`bgeserve bench --interleave`: rows loaded side by side, each phase of a round run row by row."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

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
        if self.fail_at == "finish":
            raise RowFailed("worker process exited with -9: ")
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


def test_rounds_of_an_even_count_of_phases_start_the_other_way():
    log: list[str] = []
    rows = {name: ScriptedRow(name, 1.0, log, [1.0]) for name in ("cpu-fp32", "cpu-int8")}
    options = MeasureOptions(repeats=3, query_runs=1, batch_runs=1)  # query, batch, 3 passes, matmul: 6 phases
    interleaved_outcomes([_job("cpu-fp32", options), _job("cpu-int8", options)], rounds=2, timeout_s=30.0,
                         open_row=_scripted(rows), settle_s=0)
    firsts = [entry.split(":")[0] for entry in log[0:24:2]]  # the row that opened each phase
    assert firsts == ["cpu-fp32", "cpu-int8"] * 3 + ["cpu-int8", "cpu-fp32"] * 3
    assert firsts.count("cpu-fp32") == firsts.count("cpu-int8")


def test_a_row_that_fails_at_its_end_fails_though_its_rounds_measured():
    log: list[str] = []
    rows = {"cpu-fp32": ScriptedRow("cpu-fp32", 1.0, log, [1.0]),
            "cpu-int8": ScriptedRow("cpu-int8", 1.0, log, [1.0], fail_at="finish")}
    outcomes, _ = interleaved_outcomes([_job("cpu-fp32"), _job("cpu-int8")], rounds=2, timeout_s=30.0,
                                       open_row=_scripted(rows), settle_s=0)
    assert [o.status for o in outcomes[1]] == ["ok", "failed"]
    assert outcomes[1][1].reason == "at its end: worker process exited with -9: "
    assert [o.status for o in outcomes[0]] == ["ok", "ok"] and outcomes[0][1].measurement.dense is not None
    assert rows["cpu-int8"].closed and rows["cpu-fp32"].closed


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


def _served(job: Job, folder: Path, commands: str) -> list[dict]:
    replies = io.StringIO()
    serve(job, folder, io.StringIO(commands), replies)
    return [json.loads(line) for line in replies.getvalue().splitlines()]


def test_the_worker_answers_each_phase_and_its_end(tiny_m3, tmp_path):
    job = Job("cpu-fp32", RunSettings(str(tiny_m3)), MeasureOptions(repeats=1, query_runs=3, batch_runs=2),
              ["one text", "another text"], "a query", ["one text"])
    answers = _served(job, tmp_path, "query\nbatch\npass\nmatmul\nfinish\n")
    assert [a["status"] for a in answers] == ["ready", "ok", "ok", "ok", "ok", "ok"]
    assert [len(a["values"]) for a in answers[1:4]] == [3, 2, 1]
    assert answers[4]["values"][0] > 0  # TFLOP/s of the row's product
    end = answers[5]
    assert end["load_seconds"] > 0 and end["memory_kind"] == "rss"
    assert np.load(tmp_path / "dense.npy").shape[0] == 2
    # The timed product's operands (2048x1024, 1024x4096 and their product in fp32: 56 MB) are not the row's.
    # Compared after the first load of this process, which brings the libraries' own memory.
    without = _served(job, tmp_path, "pass\nfinish\n")[-1]
    with_product = _served(job, tmp_path, "pass\nmatmul\nfinish\n")[-1]
    assert with_product["peak_memory_bytes"] < without["peak_memory_bytes"] + 24 * 2**20

    answers = _served(job, tmp_path, "pass\nsing\nquery\n")
    assert [a["status"] for a in answers] == ["ready", "ok", "failed"]  # nothing after the failure
    assert answers[2]["reason"] == "unknown command 'sing'"

    (answer,) = _served(dataclasses.replace(job, settings=RunSettings(str(tmp_path / "nothing"))), tmp_path, "")
    assert answer["status"] == "failed" and "nothing" in answer["reason"]


def _fake_interpreter(folder: Path, body: str) -> str:
    """An executable that stands in for the openvino rows' Python (the one row kind with its own interpreter)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f"fake-python-{abs(hash(body))}"
    script.write_text(f"#!{sys.executable}\n{body}\n", encoding="utf-8")
    script.chmod(0o755)
    return str(script)


# Speaks the worker's protocol; kills itself right after its answer to command DIE_AT.
FAKE_ROW = """
import json, os, sys
open(os.path.join(sys.argv[-1], "pid"), "w").write(str(os.getpid()))
print(json.dumps({"status": "ready"}), flush=True)
for number, line in enumerate(sys.stdin, 1):
    command = line.strip()
    if command == "finish":
        end = {"load_seconds": 1.0, "peak_memory_bytes": 1, "memory_kind": "rss", "notes": []}
        print(json.dumps({"status": "ok", **end}), flush=True)
        break
    print(json.dumps({"status": "ok", "values": [] if command == "matmul" else [0.01]}), flush=True)
    if number == DIE_AT:
        os.kill(os.getpid(), 9)
"""


def _gone(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
    except ProcessLookupError:
        return True
    return False


def test_a_worker_that_dies_or_hangs_fails_its_row_with_the_reason(tmp_path):
    dying = _job("openvino-bf16", openvino_python=_fake_interpreter(tmp_path, "import sys; sys.exit('no openvino')"))
    outcome = RowProcess(dying, tmp_path / "dying", timeout_s=30).start()
    assert outcome == JobOutcome("failed", "worker process exited with 1: no openvino")

    body = "import os, sys, time; open(os.path.join(sys.argv[-1], 'pid'), 'w').write(str(os.getpid())); time.sleep(60)"
    hanging = _job("openvino-bf16", openvino_python=_fake_interpreter(tmp_path, body))
    started = time.perf_counter()
    outcome = RowProcess(hanging, tmp_path / "hanging", timeout_s=1).start()
    assert outcome == JobOutcome("failed", "did not answer within 1 s (--timeout)")
    assert time.perf_counter() - started < 10 and _gone(tmp_path / "hanging" / "pid")  # killed, not left behind

    # A worker that loads, then dies in a phase: the phase fails with the worker's last words.
    body = ("import json, sys; print(json.dumps({'status': 'ready'}), flush=True); sys.stdin.readline(); "
            "sys.exit('killed by the kernel')")
    row = RowProcess(_job("openvino-bf16", openvino_python=_fake_interpreter(tmp_path, body)), tmp_path / "w", 30)
    assert row.start() is None
    with pytest.raises(RowFailed, match="worker process exited with 1: killed by the kernel"):
        row.run("pass")
    row.close()


def test_a_worker_killed_while_it_waits_fails_its_row_and_the_others_go_on(tmp_path):
    # Row 2 dies (as under the OOM killer) after its batch phase, while row 1 runs the next phase: the bench
    # then writes to a dead process. That row fails with the reason; row 1's rounds are all there.
    lasting = _fake_interpreter(tmp_path / "a", FAKE_ROW.replace("DIE_AT", "0"))
    killed = _fake_interpreter(tmp_path / "b", FAKE_ROW.replace("DIE_AT", "2"))
    jobs = [_job("openvino-bf16", openvino_python=lasting), _job("openvino-int8", openvino_python=killed)]
    outcomes, _ = interleaved_outcomes(jobs, rounds=2, timeout_s=30.0, settle_s=0.3)
    assert [o.status for o in outcomes[0]] == ["ok", "ok"]
    assert outcomes[0][1].measurement.corpus_seconds == [0.01, 0.01]
    assert [o.status for o in outcomes[1]] == ["failed"]
    assert outcomes[1][0].reason.startswith("worker process exited with -9")


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
    assert "every row loaded (and warmed up) once, each in its own process" in out and "5 rounds:" not in out
    assert "2 rounds: texts/s is the median" in out
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


def test_on_cuda_a_pause_keeps_the_product_out_of_the_peak(monkeypatch):
    import torch

    class Allocator:  # torch.cuda's counters, as the caching allocator keeps them
        allocated = peak = 100

        def take(self, n: int) -> None:
            self.allocated += n
            self.peak = max(self.peak, self.allocated)

        def reset(self, _device: str) -> None:
            self.peak = self.allocated

    gpu = Allocator()
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", gpu.reset)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda _device: gpu.allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda _device: gpu.peak)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda _device: None)
    memory = PeakMemory("cuda:0")
    memory.start()
    gpu.take(500)  # the row's activations
    gpu.take(-500)
    memory.pause()
    gpu.take(4000)  # a timed product's operands
    gpu.take(-4000)
    memory.resume()
    gpu.take(300)
    assert memory.stop() == 500
