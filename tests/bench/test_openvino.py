"""The openvino peer for real: optimum-intel under its own interpreter (.venv-openvino, made here when missing)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bgeserve.cli import main

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "openvino_venv.sh"
VENV = REPO / ".venv-openvino"


@pytest.fixture(scope="session")
def openvino_python() -> str:
    """The interpreter scripts/openvino_venv.sh makes (about 1.5 min and 1.5 GB on a fresh machine)."""
    if not (VENV / ".installed").exists():
        done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900, check=False)
        assert done.returncode == 0, f"{SCRIPT} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return str(VENV / "bin" / "python")


@pytest.mark.slow
def test_openvino_rows_match_our_fp32(openvino_python, tiny_m3, corpus_file, tmp_path, capsys):
    """fp32 gives our fp32 vectors (cosine >= 0.9999) at f32 precision; int8 is quantised and close."""
    out_json = tmp_path / "ov.json"
    code = main(["bench", "--model", str(tiny_m3), "--corpus", str(corpus_file), "--inline",
                 "--repeats", "1", "--query-runs", "2", "--batch-runs", "1", "--batch", "4", "--timeout", "300",
                 "--configs", "cpu-fp32", "--compare", "openvino-fp32,openvino-int8",
                 "--openvino-python", openvino_python, "--cache-dir", str(tmp_path / "cache"),
                 "--json", str(out_json)])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    doc = json.loads(out_json.read_text(encoding="utf-8"))
    rows = {r["config"]: r for r in doc["rows"]}
    assert doc["fidelity_reference"] == "cpu-fp32"
    fp32, int8 = rows["openvino-fp32"], rows["openvino-int8"]
    assert fp32["status"] == "ok", fp32
    assert fp32["fidelity"]["min_cosine"] >= 0.9999
    assert any("inference precision f32" in note for note in fp32["notes"]), fp32["notes"]
    assert int8["status"] == "ok", int8
    assert 0.9 < int8["fidelity"]["min_cosine"] < 1.0
    assert any("int8 weights and activations" in note for note in int8["notes"]), int8["notes"]
    # One export serves both rows, cached like the ONNX peers' exports.
    (export,) = (tmp_path / "cache" / "openvino-peer").iterdir()
    assert {p.name for p in export.iterdir()} == {"fp32", "int8"}
    for precision in ("fp32", "int8"):  # each written aside and renamed in, marked complete inside
        assert (export / precision / ".complete").is_file() and (export / precision / "openvino_model.xml").is_file()
