"""`bgeserve encode`: JSON lines in input order, FlagEmbedding keys, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from bgeserve import Embedder


def _encode(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bgeserve", "encode", *args],
        input=stdin, capture_output=True, text=True, timeout=300,
    )


def test_plain_and_json_lines_with_all_outputs(m3_checkpoint):
    stdin = 'first text\n{"id": "doc-7", "text": "北京是中国的首都"}\n\n  spaced line\n'
    proc = _encode(["--model", str(m3_checkpoint), "--dtype", "fp32", "--sparse", "--colbert", "--no-progress"], stdin)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[1]["id"] == "doc-7" and "id" not in rows[0]
    expected = Embedder(str(m3_checkpoint), device="cpu", dtype="fp32").encode(
        ["first text", "北京是中国的首都", "  spaced line"], return_sparse=True, return_colbert_vecs=True
    )
    for i, row in enumerate(rows):
        assert np.abs(np.array(row["dense_vecs"]) - expected["dense_vecs"][i]).max() <= 1e-6
        assert row["lexical_weights"].keys() == expected["lexical_weights"][i].keys()
        assert np.array(row["colbert_vecs"]).shape == expected["colbert_vecs"][i].shape


def test_file_in_file_out_with_bundled_model(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(f"sentence number {i}" for i in range(40)) + "\n")
    dst = tmp_path / "out.jsonl"
    proc = _encode(["-i", str(src), "-o", str(dst), "--dtype", "fp32"], "")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(rows) == 40 and len(rows[0]["dense_vecs"]) == 384
    assert "encode" in proc.stderr  # the progress bar


def test_bad_model_path_is_a_message_not_a_traceback(tmp_path):
    proc = _encode(["--model", str(tmp_path / "missing")], "x\n")
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_sparse_from_a_model_without_heads(tmp_path):
    proc = _encode(["--sparse"], "x\n")
    assert proc.returncode != 0
    assert "sparse_linear.pt" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_json_line(tmp_path):
    proc = _encode([], '{"text": 5}\n')
    assert proc.returncode != 0 and "line 1" in proc.stderr and "Traceback" not in proc.stderr


def test_help_explains_input_and_output():
    proc = subprocess.run([sys.executable, "-m", "bgeserve", "encode", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "JSON lines" in proc.stdout and "--sparse" in proc.stdout
