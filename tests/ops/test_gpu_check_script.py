"""scripts/gpu_check.sh: valid bash; without a GPU it still reports and ends with its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def test_script_is_valid_bash_and_executable() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)


def test_script_needs_an_output_directory() -> None:
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "usage" in done.stderr


@pytest.mark.slow
def test_script_runs_without_a_gpu_and_prints_the_table_last(m3_checkpoint: Path, tmp_path: Path) -> None:
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        CKPT_DIR=str(m3_checkpoint),  # the tiny checkpoint: no 2.3 GB generation in CI
        BUDGET_S="150",
        CUDA_VISIBLE_DEVICES="",  # behave as a CPU machine even where a GPU exists
        SKIP_STEPS="gpu-tests,bench",  # other areas' work, slow on 2 cores; the rows must still show
    )
    out = tmp_path / "out"
    done = subprocess.run([str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=300)
    lines = done.stdout.rstrip().splitlines()
    assert lines[-1].startswith("total ") and str(out) in lines[-1], done.stdout[-2000:]
    table = done.stdout[done.stdout.rindex("\nSTEP ") :]
    for step in ("doctor", "gpu-tests", "checkpoint", "doctor-model", "bench"):
        assert f"\n{step} " in table, table
    report = json.loads((out / "doctor.json").read_text())
    assert report["facts"]["cuda_visible_devices"] == ""
    assert json.loads((out / "doctor_model.json").read_text())["checks"][-1]["name"] == "model"
    assert "\nbench         skipped" in table
    assert (out / "summary.txt").read_text().strip().endswith(lines[-1])
