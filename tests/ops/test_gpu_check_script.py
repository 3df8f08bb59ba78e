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
    for step in ("doctor", "gpu-tests", "checkpoint", "doctor-model", "bench-512", "bench"):
        assert f"\n{step} " in table, table
    # Without CUDA every row of the 512-token bench is skipped, and its table says why.
    assert "bench512.json: 64 texts" in table
    assert "cuda-bf16          skipped" in table and "no CUDA device visible to torch" in table
    report = json.loads((out / "doctor.json").read_text())
    assert report["facts"]["cuda_visible_devices"] == ""
    assert json.loads((out / "doctor_model.json").read_text())["checks"][-1]["name"] == "model"
    assert "\nbench         skipped" in table
    assert (out / "summary.txt").read_text().strip().endswith(lines[-1])


def _wheel(directory: Path, name: str) -> Path:
    """A minimal pure-Python wheel holding the module `name` (VALUE = 42)."""
    import zipfile

    info = f"{name}-0.1.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    path = directory / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_carried_wheels_are_installed_first_on_the_path(m3_checkpoint: Path, tmp_path: Path) -> None:
    """A GPU machine with no network: wheels from WHEEL_DIR (scripts/gpu_wheels.sh) go into a scratch site
    that the steps import from."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "carried_probe")
    site = tmp_path / "site"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        CKPT_DIR=str(m3_checkpoint),
        WHEEL_DIR=str(wheels),
        WHEEL_SITE=str(site),
        CUDA_VISIBLE_DEVICES="",
        SKIP_STEPS="doctor,gpu-tests,doctor-model,bench-512,bench",
    )
    # The real-weight model scripts/gpu_wheels.sh puts beside the wheels is what the GPU tests are pointed at.
    (wheels / "minilm-fp16").mkdir()
    (wheels / "minilm-fp16" / "config.json").write_text("{}")
    out = tmp_path / "out"
    done = subprocess.run([str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=300)
    table = done.stdout[done.stdout.rindex("\nSTEP ") :]
    assert f"1 wheel(s) into {site}" in table, done.stdout + done.stderr
    assert f"real-weight model for the GPU tests: {wheels / 'minilm-fp16'}" in done.stderr
    assert (site / "carried_probe" / "__init__.py").is_file()
    assert done.returncode == 0, table

    # A broken wheel makes the run fail, and the steps after it still report.
    (wheels / "broken-0.1-py3-none-any.whl").write_text("not a zip")
    done = subprocess.run([str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=300)
    table = done.stdout[done.stdout.rindex("\nSTEP ") :]
    assert "\nwheels        exit" in table, table
    assert done.returncode == 1


def test_wheel_fetcher_is_valid_bash_and_pins_from_an_interpreter(tmp_path: Path) -> None:
    fetcher = SCRIPT.parent / "gpu_wheels.sh"
    subprocess.run(["bash", "-n", str(fetcher)], check=True)
    assert os.access(fetcher, os.X_OK)
    # Versions come from an installed interpreter: a name it does not have is a clear error, before any download.
    env = dict(os.environ, PYTHON=sys.executable, GPU_WHEELS="no-such-distribution-xyz")
    done = subprocess.run([str(fetcher), str(tmp_path / "w")], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert "no-such-distribution-xyz is not installed" in done.stderr
    env = dict(os.environ, PYTHON=str(tmp_path / "missing-python"))
    done = subprocess.run([str(fetcher), str(tmp_path / "w")], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "no interpreter" in done.stderr


def test_half_model_copy_is_the_same_model_in_half_the_bytes(minilm_path: Path, tmp_path: Path) -> None:
    """scripts/half_model.py: what gpu_wheels.sh carries to the GPU machine as the tests' real weights."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from bgeserve.core import OutputRequest
    from bgeserve.models.checkpoint import load_checkpoint
    from bgeserve.runtime.torch_backend import TorchBackend

    script = SCRIPT.parent / "half_model.py"
    dest = tmp_path / "minilm-fp16"
    done = subprocess.run([sys.executable, str(script), str(minilm_path), str(dest)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    weights = dest / "model.safetensors"
    assert {t.dtype for t in load_file(str(weights)).values()} <= {torch.float16, torch.int64}
    assert weights.stat().st_size < 0.55 * (minilm_path / "model.safetensors").stat().st_size
    assert (dest / "tokenizer.json").read_bytes() == (minilm_path / "tokenizer.json").read_bytes()
    texts = ["a short query", "北京 is a city", "The quick brown fox jumps over the lazy dog. " * 20]
    vectors = []
    for path in (minilm_path, dest):
        ckpt = load_checkpoint(str(path))
        items = TorchBackend(ckpt).run(ckpt.tokenizer.encode(texts, max_length=ckpt.max_length).ids, OutputRequest())
        vectors.append(np.stack([item.dense for item in items]))
    assert (vectors[0] * vectors[1]).sum(1).min() >= 0.99999  # fp16 storage only rounds the weights

    for args, message in (([str(tmp_path / "missing"), str(tmp_path / "x")], "is not a directory"),
                          ([str(tmp_path), str(tmp_path / "x")], "has no model.safetensors"),
                          ([str(minilm_path)], "usage")):
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
