"""The Ray Data corpus job on a two-node `ray.cluster_utils.Cluster`: `bgeserve encode`'s vectors, in input
order, one Parquet file per input; a rerun redoes only what is missing; a node removed mid-job still
leaves complete, duplicate-free outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from deadlines import deadline, wait_for
from ray.cluster_utils import Cluster

from bgeserve.cli import encode as encode_command
from bgeserve.data import sample_texts
from bgeserve.ray import run_corpus_job
from bgeserve.ray.commands import add_encode_arguments, encode_on_ray
from bgeserve.ray.corpus_files import PARTS_DIR

# What every job here runs with: one torch thread per actor (as `bgeserve encode --threads 1`), two actors.
JOB = {"dtype": "fp32", "num_cpus": 1, "concurrency": 2, "tokenize_num_cpus": 0.25}


@pytest.fixture(scope="module")
def cluster():
    """A head (1 CPU) and a worker node (2 CPUs): at least one embedding actor lives on the worker."""
    with deadline(120, "starting the two-node cluster"):
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        worker = nodes.add_node(num_cpus=2)
        ray.init(address=nodes.address, logging_level="warning", log_to_driver=False)
    yield nodes, worker
    with deadline(60, "stopping the cluster"):
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """3,000 texts in three files: JSON lines with text ids (and blank and plain-text lines), Parquet
    with integer ids in several row groups, JSON lines with integer ids."""
    texts = sample_texts()
    rows = [(i, f"{texts[i * 37 % len(texts)]} #{i}") for i in range(3000)]
    root = tmp_path_factory.mktemp("corpus")
    with (root / "a.jsonl").open("w") as f:
        for i, text in rows[:1200]:
            f.write(json.dumps({"id": f"doc-{i}", "text": text}, ensure_ascii=False) + "\n")
            if i % 400 == 3:
                f.write("\n")  # skipped, as `bgeserve encode` skips it
        f.write("a plain line without an id\n")
    sub = root / "more"
    sub.mkdir()
    pq.write_table(pa.table({"id": [i for i, _ in rows[1200:2200]], "text": [t for _, t in rows[1200:2200]]}),
                   sub / "b.parquet", row_group_size=300)
    with (root / "c.jsonl").open("w") as f:
        for i, text in rows[2200:]:
            f.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")
    return root


@pytest.fixture(scope="module")
def encoded(corpus, m3_checkpoint, tmp_path_factory) -> dict[str, list[dict]]:
    """`bgeserve encode` of each input file (Parquet via the same rows as JSON lines), by output name."""
    work = tmp_path_factory.mktemp("encode")
    b_rows = pq.read_table(corpus / "more" / "b.parquet").to_pylist()
    (work / "b.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in b_rows))
    sources = {"a.parquet": corpus / "a.jsonl", "more/b.parquet": work / "b.jsonl", "c.parquet": corpus / "c.jsonl"}

    def encode(source: Path) -> list[dict]:
        proc = subprocess.run(
            [sys.executable, "-m", "bgeserve", "encode", "--model", str(m3_checkpoint), "--dtype", "fp32",
             "--threads", "1", "--sparse", "--colbert", "--no-progress", "-i", str(source)],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line) for line in proc.stdout.splitlines()]

    with ThreadPoolExecutor(3) as pool:
        return dict(zip(sources, pool.map(encode, sources.values()), strict=True))


@pytest.fixture(scope="module")
def first_run(cluster, corpus, m3_checkpoint, tmp_path_factory):
    """The job over the whole corpus: (output dir, summary, what it printed on stderr)."""
    out = tmp_path_factory.mktemp("out")
    printed = io.StringIO()
    with deadline(180, "the corpus job"), contextlib.redirect_stderr(printed):
        summary = run_corpus_job(str(corpus / "**" / "*"), out, model=str(m3_checkpoint), id_column="id",
                                 sparse=True, colbert=True, **JOB)
    return out, summary, printed.getvalue()


def assert_matches_encode(table: pa.Table, reference: list[dict]) -> None:
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [ref.get("id") for ref in reference]
    for row, ref in zip(rows, reference, strict=True):
        # The same tokens through the same model on one thread: dense and ColBERT to the bit.
        assert np.array_equal(np.array(row["dense"], np.float32), np.array(ref["dense_vecs"], np.float32))
        assert np.array_equal(np.array(row["colbert"], np.float32), np.array(ref["colbert_vecs"], np.float32))
        # Lexical weights: the same tokens; values within float32 rounding (batches are composed differently).
        assert row["sparse_indices"] == sorted(int(k) for k in ref["lexical_weights"])
        expected = [ref["lexical_weights"][str(k)] for k in row["sparse_indices"]]
        np.testing.assert_allclose(row["sparse_values"], expected, rtol=0, atol=1e-6)


def test_job_output_matches_bgeserve_encode(first_run, encoded, m3_checkpoint):
    out, summary, printed = first_run
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet")) == sorted(encoded)
    assert not (out / PARTS_DIR).exists() or not any((out / PARTS_DIR).rglob("*.parquet"))
    for name, reference in encoded.items():
        table = pq.read_table(out / name)
        assert table.schema.field("dense").type == pa.list_(pa.float32(), 32)  # fixed-size list of float32
        assert table.schema.field("sparse_indices").type == pa.list_(pa.int32())
        assert table.schema.field("colbert").type == pa.list_(pa.list_(pa.float32(), 32))
        assert_matches_encode(table, reference)
    assert pq.read_table(out / "c.parquet").schema.field("id").type == pa.int64()
    assert summary.rows == 3001 and summary.files == 3 and summary.files_skipped == 0
    total_tokens = sum(len(ref["colbert_vecs"]) + 1 for reference in encoded.values() for ref in reference)
    assert summary.tokens == total_tokens and summary.tokens_per_second > 0
    assert "3001/3001 rows, 3/3 files" in printed and "rows/s" in printed


def test_rerun_redoes_only_missing_outputs_and_drops_stale_parts(first_run, corpus, m3_checkpoint, tmp_path):
    done, _, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(done, out)
    (out / "c.parquet").unlink()
    # What a job killed while writing c leaves: parts (here one with wrong vectors) and no output.
    stale = out / PARTS_DIR / "c"
    stale.mkdir(parents=True)
    bad = pq.read_table(done / "c.parquet").slice(0, 10).drop_columns(["id"])
    bad = bad.set_column(0, "dense", pa.array([[0.0] * 32] * 10, pa.list_(pa.float32(), 32)))
    pq.write_table(bad.append_column("_row", pa.array(np.arange(10), pa.int64())), stale / "000000000000-x.parquet")
    untouched = {p: p.stat().st_mtime_ns for p in (out / "a.parquet", out / "more" / "b.parquet")}

    with deadline(120, "the rerun"):
        summary = run_corpus_job(str(corpus / "**" / "*"), out, model=str(m3_checkpoint), sparse=True, colbert=True,
                                 progress=False, **JOB)
    assert (summary.files, summary.files_skipped, summary.rows) == (1, 2, 800)
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    redone, first = pq.read_table(out / "c.parquet"), pq.read_table(done / "c.parquet")
    assert redone.column("id").to_pylist() == first.column("id").to_pylist()
    assert redone.column("dense").equals(first.column("dense"))
    assert not stale.exists()

    # A third run, through the flags of `bgeserve encode --ray`: nothing left to do.
    args = encode_parser().parse_args(["--ray", "--model", str(m3_checkpoint), "--input", str(corpus / "**" / "*"),
                                       "--output", str(out), "--sparse", "--colbert", "--concurrency", "2"])
    printed = io.StringIO()
    with deadline(60, "the third run"), contextlib.redirect_stderr(printed):
        assert encode_on_ray(args) == 0
    assert "0 rows, 0 tokens from 0 files (3 already complete)" in printed.getvalue()


def encode_parser() -> argparse.ArgumentParser:
    """`bgeserve encode`'s parser with the Ray flags, as bgeserve/cli/encode.py adds them."""
    sub = argparse.ArgumentParser(prog="bgeserve").add_subparsers()
    encode_command.register(sub)
    parser = sub.choices["encode"]
    if "--ray" not in parser._option_string_actions:
        add_encode_arguments(parser)
    return parser


def test_unreadable_line_fails_the_job_naming_it(cluster, m3_checkpoint, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "text": "fine"}\n{"id": 2, "body": "no text"}\n')
    with deadline(90, "the failing job"), pytest.raises(Exception, match=r"bad.jsonl line 2.*'text'"):
        run_corpus_job(str(tmp_path / "*.jsonl"), tmp_path / "out", model=str(m3_checkpoint), progress=False, **JOB)
    assert not (tmp_path / "out" / "bad.parquet").exists()


def test_node_removed_mid_job_leaves_complete_duplicate_free_outputs(cluster, first_run, corpus, m3_checkpoint,
                                                                     tmp_path):
    nodes, worker = cluster
    done, _, _ = first_run
    out = tmp_path / "out"
    outcome: dict = {}

    def job() -> None:
        try:
            # Small batches: many part files, so the node goes while most of the corpus is still to do.
            outcome["summary"] = run_corpus_job(
                str(corpus / "**" / "*"), out, model=str(m3_checkpoint), sparse=True, colbert=True,
                progress=False, batch_size=32, block_rows=128, **JOB,
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            outcome["error"] = exc

    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    wait_for(lambda: any((out / PARTS_DIR).rglob("*.parquet")) or not runner.is_alive(), 90, "the first part file")
    assert runner.is_alive(), f"the job ended before the node could be removed: {outcome}"
    nodes.remove_node(worker)  # its actor, tasks and objects go with it
    nodes.add_node(num_cpus=2)  # a replacement, as an autoscaler would start
    runner.join(150)
    assert not runner.is_alive(), "the job did not finish within 150 s of losing a node"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"].rows == 3001
    for name in ("a.parquet", "more/b.parquet", "c.parquet"):
        table, reference = pq.read_table(out / name), pq.read_table(done / name)
        ids = table.column("id").to_pylist()
        assert ids == reference.column("id").to_pylist()  # every row once, in input order
        assert table.column("dense").equals(reference.column("dense"))
        assert table.column("colbert").equals(reference.column("colbert"))
