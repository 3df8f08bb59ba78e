"""`bgeserve bench` offline mode end to end on the tiny checkpoint: table, JSON, plot, ratios, fidelity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bgeserve.bench import offline
from bgeserve.bench.configs import BenchConfig, MachineFacts, onnx_backend_available
from bgeserve.bench.flops import projection_flops_per_token
from bgeserve.bench.job import JobOutcome
from bgeserve.bench.measure import Measurement, MeasureOptions
from bgeserve.bench.offline import Corpus, OfflinePlan, build_corpus, fidelity, spread
from bgeserve.bench.report import offline_table, ratio_table
from bgeserve.bench.runners import RunSettings, pooled_normalized
from bgeserve.cli import main
from bgeserve.models.config import EncoderConfig
from bgeserve.runtime.cpu_info import cpu_flags, speed_flags

FAST = ["--repeats", "2", "--query-runs", "3", "--batch-runs", "2", "--batch", "4"]


def _bench(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["bench", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _bench_json(capsys, tmp_path, model, corpus, *args: str) -> tuple[int, str, str, dict]:
    """A FAST bench run of `model` on `corpus`, with its JSON document read back."""
    out_json = tmp_path / "bench.json"
    code, out, err = _bench(capsys, "--model", str(model), "--corpus", str(corpus), *FAST, *args,
                            "--json", str(out_json))
    return code, out, err, json.loads(out_json.read_text(encoding="utf-8"))


def _table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| config"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def inline_run(tiny_m3, bench_texts, tmp_path_factory):
    """One inline run with ours, two peers and rows this machine cannot run."""
    folder = tmp_path_factory.mktemp("bench-inline")
    corpus = folder / "texts.txt"
    corpus.write_text("\n".join(bench_texts), encoding="utf-8")
    args = ["--model", str(tiny_m3), "--corpus", str(corpus), "--inline", *FAST,
            "--configs", "cpu-fp32-t1,cpu-fp32,cpu-int8,onnx-fp32,cuda-fp16",
            "--compare", "transformers-fp32,flagembedding-fp32",
            "--json", str(folder / "out.json"), "--plot", str(folder / "out.png"),
            "--cache-dir", str(folder / "cache")]
    code = main(["bench", *args])
    return code, folder


def test_table_lists_every_config_and_peer(inline_run, capsys, tiny_m3, tmp_path):
    # Re-run cheaply for stdout: the module fixture's output went to another test's capture.
    corpus = tmp_path / "t.txt"
    corpus.write_text("one short text\nanother short text here\n", encoding="utf-8")
    code, out, err = _bench(capsys, "--model", str(tiny_m3), "--corpus", str(corpus), "--inline", *FAST,
                            "--configs", "cpu-fp32-t1,cpu-fp32,cuda-fp16,cuda-bf16")
    assert code == 0
    rows = _table_rows(out)
    assert list(rows) == ["cpu-fp32-t1", "cpu-fp32", "cuda-fp16", "cuda-bf16"]
    assert rows["cpu-fp32-t1"][6] == "1.00x"  # the baseline divides by itself
    assert float(rows["cpu-fp32"][1].replace(",", "")) > 0
    import torch

    if not torch.cuda.is_available():
        assert "skipped: no CUDA device" in rows["cuda-fp16"][-1]
        assert rows["cuda-fp16"][1] == "—"
    assert "2 texts" in out and "cpu-fp32-t1: running" in err


def test_json_shape_ratios_and_fidelity(inline_run, tiny_m3):
    code, folder = inline_run
    flops = projection_flops_per_token(EncoderConfig.from_file(tiny_m3 / "config.json"))
    assert code == 0
    doc = json.loads((folder / "out.json").read_text(encoding="utf-8"))
    assert doc["mode"] == "offline" and doc["baseline"] == "cpu-fp32-t1"
    assert doc["corpus"]["texts"] == 10 and doc["corpus"]["tokens"] > 10
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["versions"]["torch"]
    assert doc["machine"]["cpu_flags"] == speed_flags(cpu_flags())
    rows = {r["config"]: r for r in doc["rows"]}
    assert list(rows) == ["cpu-fp32-t1", "cpu-fp32", "cpu-int8", "onnx-fp32", "cuda-fp16",
                          "transformers-fp32", "flagembedding-fp32"]
    base = rows["cpu-fp32-t1"]
    for name in ("cpu-fp32-t1", "cpu-fp32", "cpu-int8", "transformers-fp32", "flagembedding-fp32"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["texts_per_s"] > 0 and row["tokens_per_s"] > row["texts_per_s"]
        # tokens/s counts real tokens: the same corpus total for every row
        assert row["tokens_per_s"] / row["texts_per_s"] == pytest.approx(doc["corpus"]["mean_tokens"])
        assert row["speedup"] == pytest.approx(row["texts_per_s"] / base["texts_per_s"])
        assert row["query_latency_ms"]["n"] == 3 and row["batch_latency_ms"]["n"] == 2
        lat = row["query_latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        assert len(row["corpus_seconds"]) == 2
        assert row["wall_seconds"] >= row["load_seconds"] + sum(row["corpus_seconds"])
        assert row["peak_memory_mb"] is not None and row["memory_kind"] == "rss"
        # Every row's model rate; the share of a product rate only where one was timed: our torch rows in a
        # floating-point precision (CUDA and CPU), never int8 or a peer.
        assert row["model_tflops"] == pytest.approx(row["tokens_per_s"] * flops / 1e12)
        if name in ("cpu-fp32-t1", "cpu-fp32"):
            assert row["device_matmul_tflops"] > 0
            assert row["matmul_use"] == pytest.approx(row["model_tflops"] / row["device_matmul_tflops"])
            assert any("2048x1024x4096 product here" in note for note in row["notes"])
        else:
            assert row["matmul_use"] is None and row["device_matmul_tflops"] is None
    assert doc["fidelity_reference"] == "cpu-fp32-t1"
    assert base["fidelity"]["min_cosine"] == pytest.approx(1.0) and base["fidelity"]["max_abs_diff"] == 0.0
    # Exact peers agree with our fp32 to float rounding; int8 is close but not exact.
    for peer in ("transformers-fp32", "flagembedding-fp32"):
        assert rows[peer]["peer"] is True
        assert rows[peer]["fidelity"]["max_abs_diff"] < 1e-4
    assert 0.9 < rows["cpu-int8"]["fidelity"]["min_cosine"] < 1.0
    if onnx_backend_available():
        assert rows["onnx-fp32"]["status"] == "ok", rows["onnx-fp32"]
        assert rows["onnx-fp32"]["fidelity"]["max_abs_diff"] < 1e-4
    else:
        assert rows["onnx-fp32"]["status"] == "skipped"
        assert rows["onnx-fp32"]["reason"] == "ONNX backend not available"
    assert rows["cuda-fp16"]["status"] in ("ok", "skipped")
    assert rows["cuda-fp16"]["status"] == "ok" or rows["cuda-fp16"]["texts_per_s"] is None


def test_plot_is_a_png(inline_run):
    _, folder = inline_run
    data = (folder / "out.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_a_fresh_process_per_row(tiny_m3, corpus_file, capsys, tmp_path):
    code, out, _, doc = _bench_json(capsys, tmp_path, tiny_m3, corpus_file, "--configs", "cpu-fp32,cpu-int8-t1")
    assert code == 0
    assert doc["protocol"]["process_per_row"] is True
    rows = {r["config"]: r for r in doc["rows"]}
    assert rows["cpu-fp32"]["status"] == rows["cpu-int8-t1"]["status"] == "ok"
    assert doc["baseline"] == "cpu-fp32"  # no cpu-fp32-t1 listed: the first row that ran
    assert rows["cpu-int8-t1"]["fidelity"]["min_cosine"] > 0.9
    assert "one fresh process per row" in out


def test_all_outputs_and_untimed_reference(tiny_m3, corpus_file, capsys, tmp_path):
    """No fp32 row: fidelity still compares with our fp32, from an extra untimed pass."""
    code, out, _, doc = _bench_json(capsys, tmp_path, tiny_m3, corpus_file, "--inline", "--configs", "cpu-int8",
                                    "--outputs", "all", "--compare", "transformers-fp32")
    assert code == 0
    assert doc["settings"]["outputs"] == "all"
    assert doc["fidelity_reference"] == "cpu-fp32 (untimed)"
    rows = {r["config"]: r for r in doc["rows"]}
    assert rows["cpu-int8"]["fidelity"]["min_cosine"] > 0.9
    assert rows["transformers-fp32"]["status"] == "skipped" and "dense" in rows["transformers-fp32"]["reason"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--configs", "cpu-fp16"], "unknown config"),
        (["--configs", "cpu-fp32", "--baseline", "cpu-int8"], "not among the configs"),
        (["--compare", "cpu-fp32"], "--configs"),
        (["--limit", "0"], "--limit"),
        (["--plot", "out.svg"], ".png"),
        (["--duration", "5"], "HTTP mode"),
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--ratios", "cpu-fp32"], "A/B pairs"),
        (["--ratios", "cpu-fp32/cpu-fp32"], "a row against itself"),
        (["--ratios", "bogus/cpu-fp32"], "unknown config"),
        (["--configs", "cpu-fp32", "--ratios", "cpu-int8/cpu-fp32"], "not among the configs"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message, tiny_m3, corpus_file, capsys):
    code, out, err = _bench(capsys, "--model", str(tiny_m3), "--corpus", str(corpus_file), *args)
    assert code == 2
    assert message in err and "Traceback" not in err and out == ""


def test_missing_corpus_and_model(tmp_path, capsys):
    code, _, err = _bench(capsys, "--corpus", str(tmp_path / "nope.txt"))
    assert code == 2 and "does not exist" in err
    (tmp_path / "t.txt").write_text("hello\n", encoding="utf-8")
    code, _, err = _bench(capsys, "--model", str(tmp_path / "no-model"), "--corpus", str(tmp_path / "t.txt"))
    assert code == 1 and "error" in err and "Traceback" not in err


def test_fidelity_and_corpus_helpers():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(6, 8))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    same = fidelity(ref.copy(), ref)
    assert same["min_cosine"] == pytest.approx(1.0) and same["max_abs_diff"] == 0.0
    flipped = ref.copy()
    flipped[2] *= -1
    assert fidelity(flipped, ref)["min_cosine"] == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        fidelity(ref[:3], ref)
    assert spread(list("abcdefgh"), 4) == ["a", "c", "e", "g"]
    assert spread(list("abc"), 10) == ["a", "b", "c"]
    lines = ["a b", "", "a b c d e f g h i j", "a"]
    corpus = build_corpus("x", lines, lambda ts: [len(t.split()) + 2 for t in ts], batch_size=2)
    assert corpus.texts == ["a b", "a b c d e f g h i j", "a"]
    assert corpus.query == "a b c d e f g h i j"  # 12 tokens with the two specials
    assert corpus.total_tokens == 4 + 12 + 3 and len(corpus.batch) == 2


@pytest.fixture(scope="module")
def wide_m3(tmp_path_factory):
    """bge-m3's width (hidden 1024) with one layer: the smallest checkpoint bge-m3-lite accepts."""
    from bgeserve.testing.synthetic import write_m3_checkpoint

    return write_m3_checkpoint(tmp_path_factory.mktemp("bench-wide") / "wide", size="wide")


def test_onnx_peers_run_on_the_plain_export(wide_m3, corpus_file, capsys, tmp_path):
    """onnxruntime and bge-m3-lite run the same cached export; fp32 is exact, int8 close, all outputs too."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("bge_m3_lite")
    code, out, _, doc = _bench_json(capsys, tmp_path, wide_m3, corpus_file, "--inline", "--configs", "cpu-fp32",
                                    "--compare", "onnxruntime-fp32,bgelite", "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, out
    rows = {r["config"]: r for r in doc["rows"]}
    assert list(rows) == ["cpu-fp32", "onnxruntime-fp32", "bgelite-fp32", "bgelite-int8"]
    for row in rows.values():
        assert row["status"] == "ok", row
    for exact in ("onnxruntime-fp32", "bgelite-fp32"):
        assert rows[exact]["fidelity"]["max_abs_diff"] < 1e-4
    assert 0.9 < rows["bgelite-int8"]["fidelity"]["min_cosine"] < 1.0
    # One export serves both peers: bge-m3-lite's graph only renames the output and shares the weights.
    exports = (tmp_path / "cache" / "onnx-peer").glob("*/*/*.onnx")
    assert {p.relative_to(p.parents[1]).as_posix() for p in exports} == {
        "fp32/model.onnx", "fp32/model.token-embeddings.onnx", "int8/model.onnx", "int8/model.token-embeddings.onnx"
    }


def test_peers_pool_as_the_checkpoint_does(minilm_path, corpus_file, capsys, tmp_path):
    """all-MiniLM-L6-v2 is mean-pooled (its 1_Pooling config): the transformers and onnxruntime peers read
    that too, so their fp32 vectors are ours, and their int8 rows' fidelity is that of real weights."""
    pytest.importorskip("onnxruntime")
    code, out, _, doc = _bench_json(capsys, tmp_path, minilm_path, corpus_file, "--inline", "--configs", "cpu-fp32",
                                    "--compare", "transformers-fp32,onnxruntime-fp32",
                                    "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, out
    rows = {r["config"]: r for r in doc["rows"]}
    for peer in ("transformers-fp32", "onnxruntime-fp32"):
        assert rows[peer]["status"] == "ok", rows[peer]
        assert rows[peer]["fidelity"]["min_cosine"] >= 0.9999, rows[peer]["fidelity"]


def test_mean_pooling_leaves_padding_out():
    hidden = np.array([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]], [[0.0, 2.0], [0.0, 2.0], [0.0, 2.0]]])
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    # Row 0: the mean of its two real tokens, [2, 2]; the padded [100, 100] is left out.
    np.testing.assert_allclose(pooled_normalized(hidden, mask, "mean"), [[0.5**0.5, 0.5**0.5], [0.0, 1.0]])
    np.testing.assert_allclose(pooled_normalized(hidden, mask, "cls"), [[1.0, 0.0], [0.0, 1.0]])


def test_bgelite_takes_only_bge_m3_width(tiny_m3, corpus_file, capsys, tmp_path):
    pytest.importorskip("bge_m3_lite")
    code, _, _, doc = _bench_json(capsys, tmp_path, tiny_m3, corpus_file, "--inline", "--configs", "cpu-fp32",
                                  "--compare", "bgelite-fp32")
    assert code == 0
    row = {r["config"]: r for r in doc["rows"]}["bgelite-fp32"]
    assert row["status"] == "skipped" and "hidden size 1024" in row["reason"]


def _scripted_run(monkeypatch, script: dict[str, list[JobOutcome]]) -> list[str]:
    """Replaces the row runner by one that hands out each config's outcomes in turn; returns the call log."""
    calls: list[str] = []

    def run(plan, config, options):
        calls.append(config.name)
        return script[config.name][sum(name == config.name for name in calls) - 1]

    monkeypatch.setattr(offline, "_run", run)
    return calls


def _two_texts() -> Corpus:
    return Corpus("x", ["a", "b"], [3, 3], "a", 3, ["a"], 3)


def _measured(seconds: float, query_ms: float) -> JobOutcome:
    vectors = np.eye(2, 4, dtype=np.float32)  # two texts, the fidelity column needs their vectors
    return JobOutcome("ok", measurement=Measurement(corpus_seconds=[seconds], query_ms=[query_ms], dense=vectors))


def test_rounds_alternate_the_order_and_ratios_are_taken_within_a_round(monkeypatch):
    # The machine drifts: cpu-fp32 is 3x faster than cpu-int8 in rounds 1 and 3, level in round 2. The median
    # of same-round ratios (3x) says so; a ratio of the two medians (2.0 s / 3.0 s = 1.5x) would not.
    fp32, int8 = BenchConfig("cpu", "fp32"), BenchConfig("cpu", "int8")
    calls = _scripted_run(monkeypatch, {
        "cpu-fp32": [_measured(1.0, 10.0), _measured(3.0, 30.0), _measured(2.0, 20.0)],
        "cpu-int8": [_measured(3.0, 40.0), _measured(3.0, 30.0), _measured(6.0, 60.0)],
    })
    plan = OfflinePlan([fp32, int8], RunSettings("m"), MeasureOptions(), _two_texts(), baseline=int8, rounds=3,
                       ratios=[(fp32, int8)])
    report = offline.run_offline(plan, MachineFacts())
    assert calls == ["cpu-fp32", "cpu-int8", "cpu-int8", "cpu-fp32", "cpu-fp32", "cpu-int8"]
    rows = {row.name: row for row in report.rows}
    assert [r.texts_per_s for r in rows["cpu-fp32"].rounds] == [2.0, pytest.approx(2 / 3), 1.0]
    assert rows["cpu-fp32"].texts_per_s == pytest.approx(1.0)  # 2 texts / the median round's 2 s
    assert [r.speedup for r in rows["cpu-fp32"].rounds] == [pytest.approx(3.0), pytest.approx(1.0), pytest.approx(3.0)]
    assert rows["cpu-fp32"].speedup == pytest.approx(3.0) and rows["cpu-int8"].speedup == pytest.approx(1.0)
    assert rows["cpu-fp32"].query_ms.n == 3 and rows["cpu-fp32"].corpus_seconds == [1.0, 3.0, 2.0]
    (ratio,) = report.ratios
    assert ratio.texts_per_s == pytest.approx([3.0, 1.0, 3.0])
    assert ratio.query_p50 == pytest.approx([4.0, 1.0, 3.0])  # int8's query p50 over fp32's, round by round
    assert ratio.as_dict()["texts_per_s_ratio"] == pytest.approx(3.0)
    table = offline_table(report)
    assert "3.00x (1.00-3.00)" in table and "per round: 2.00 / 0.67 / 1.00 texts/s" in table
    assert "| cpu-fp32 / cpu-int8 | 3.00x (1.00-3.00) | 3.00x (1.00-4.00) | 3 |  |" in ratio_table(report.ratios)


def test_a_row_that_fails_in_one_round_fails_and_is_not_run_again(monkeypatch):
    fp32, int8, cuda = BenchConfig("cpu", "fp32"), BenchConfig("cpu", "int8"), BenchConfig("cuda", "fp16")
    calls = _scripted_run(monkeypatch, {
        "cpu-fp32": [_measured(1.0, 10.0)] * 3,
        "cpu-int8": [_measured(1.0, 10.0), JobOutcome("failed", "out of memory")],
    })
    plan = OfflinePlan([fp32, int8, cuda], RunSettings("m"), MeasureOptions(), _two_texts(), baseline=int8, rounds=3,
                       ratios=[(int8, fp32), (fp32, cuda)])
    report = offline.run_offline(plan, MachineFacts())  # no CUDA here: that row is skipped
    assert calls.count("cpu-int8") == 2 and calls.count("cpu-fp32") == 3 and "cuda-fp16" not in calls
    rows = {row.name: row for row in report.rows}
    assert rows["cpu-int8"].status == "failed" and rows["cpu-int8"].reason == "round 2 of 3: out of memory"
    assert rows["cpu-int8"].texts_per_s is None and rows["cpu-fp32"].status == "ok"
    # The failed baseline gives no speed-ups, and a ratio with a row that did not run says why.
    assert rows["cpu-fp32"].speedup is None and "baseline (failed): no speed-ups" in rows["cpu-int8"].notes
    assert [r.texts_per_s for r in report.ratios] == [[], []]
    assert report.ratios[0].reason == "cpu-int8 failed: round 2 of 3: out of memory"
    assert report.ratios[1].reason.startswith("cuda-fp16 skipped: ")
    assert "| cpu-int8 / cpu-fp32 | — | — | 0 | cpu-int8 failed" in ratio_table(report.ratios)


def test_ratios_without_query_runs_leave_the_query_cell_empty(monkeypatch):
    fp32, int8 = BenchConfig("cpu", "fp32"), BenchConfig("cpu", "int8")
    untimed_query = JobOutcome("ok", measurement=Measurement(corpus_seconds=[1.0], dense=np.eye(2, 4)))
    _scripted_run(monkeypatch, {"cpu-fp32": [_measured(1.0, 10.0)] * 2, "cpu-int8": [untimed_query] * 2})
    plan = OfflinePlan([fp32, int8], RunSettings("m"), MeasureOptions(query_runs=0), _two_texts(), rounds=2,
                       ratios=[(int8, fp32)])
    report = offline.run_offline(plan, MachineFacts())
    assert report.ratios[0].texts_per_s == [1.0, 1.0] and report.ratios[0].query_p50 == []
    assert "| cpu-int8 / cpu-fp32 | 1.00x | — | 2 |" in ratio_table(report.ratios)
    assert "per round: 2.00 / 2.00 texts/s |" in offline_table(report)  # no query part in the note


def test_rounds_and_ratios_from_the_command_line(tiny_m3, corpus_file, capsys, tmp_path):
    code, out, err, doc = _bench_json(capsys, tmp_path, tiny_m3, corpus_file, "--inline", "--configs",
                                      "cpu-fp32,cpu-int8", "--rounds", "2", "--ratios", "cpu-int8/cpu-fp32")
    assert code == 0
    running = [line for line in err.splitlines() if line.endswith(": running")]
    assert running == ["round 1/2 [1/2] cpu-fp32: running", "round 1/2 [2/2] cpu-int8: running",
                       "round 2/2 [2/2] cpu-int8: running", "round 2/2 [1/2] cpu-fp32: running"]
    assert "2 rounds in alternating row order" in out and "| cpu-int8 / cpu-fp32 |" in out
    assert out.startswith("machine: ") and " cores (" in out.splitlines()[0]
    assert doc["protocol"]["rounds"] == 2
    rows = {r["config"]: r for r in doc["rows"]}
    assert len(rows["cpu-int8"]["rounds"]) == 2 and len(rows["cpu-int8"]["corpus_seconds"]) == 4
    (ratio,) = doc["ratios"]
    assert ratio["a"] == "cpu-int8" and ratio["b"] == "cpu-fp32" and len(ratio["texts_per_s_ratio_per_round"]) == 2
    assert ratio["texts_per_s_ratio"] == pytest.approx(rows["cpu-int8"]["speedup"])  # fp32 is the baseline


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"fpu", "avx", "avx2", "fma"}, "(avx2, no AMX)"),  # AMD EPYC Zen 2/3
        ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "sha_ni"}, "(avx2 avx512f avx512_vnni avx512_bf16, no AMX)"),
        ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"},
         "(avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8)"),  # Sapphire Rapids
        (set(), "(no x86 speed flag read)"),  # e.g. an ARM machine
    ],
)
def test_the_machine_line_names_the_cpu_and_its_speed_flags(flags, named):
    from bgeserve.bench.report import machine_line

    machine = {"cpu": "Some CPU", "cores": 2, "cpu_flags": speed_flags(flags), "gpu": None,
               "versions": {"torch": "2.13.0", "onnxruntime": None}}
    assert machine_line(machine) == f"machine: Some CPU, 2 cores {named}; torch 2.13.0"
