"""`bgeserve doctor` and `bgeserve env` as a user runs them: output and exit statuses."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bgeserve.cli.ops import register

MACHINES = Path(__file__).parent / "machines"
REPO = Path(__file__).resolve().parents[2]


def run_cli(argv: list[str]) -> int:
    """The ops sub-commands through argparse, as `bgeserve` registers them."""
    parser = argparse.ArgumentParser(prog="bgeserve")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.mark.parametrize(
    ("machine", "status"),
    [
        ("cpu_only", 0),
        ("rtx5090x4_cu121", 1),
        ("rtx5090x4_cu130", 0),
        ("old_driver_cu121", 1),
        ("rtx5090x4_cu130_hidden", 0),
    ],
)
def test_doctor_exit_status_on_recorded_machines(machine: str, status: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["doctor", "--facts", str(MACHINES / f"{machine}.json")]) == status
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].endswith(f"{status and 4 or 0} fail")


def test_doctor_json_names_the_fix_for_the_rtx5090_upgrade(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["doctor", "--json", "--facts", str(MACHINES / "rtx5090x4_cu121.json")]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "fail" and report["exit_status"] == 1
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert {c["name"] for c in failed} == {"gpu cuda:0", "gpu cuda:1", "gpu cuda:2", "gpu cuda:3"}
    assert all("whl/cu128" in c["fix"] for c in failed)
    assert report["facts"]["torch_cuda"] == "12.1"


def test_doctor_on_this_machine(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEVICE", raising=False)
    status = run_cli(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == report["exit_status"]
    names = [c["name"] for c in report["checks"]]
    assert names[:8] == ["python", "cpu", "torch", "cudnn", "onnxruntime", "dependencies", "driver", "nvcc"]
    assert names[-1] == "devices"
    assert report["facts"]["torch_version"]


def test_doctor_report_replays_to_the_same_verdicts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(["doctor", "--json"])
    first = capsys.readouterr().out
    (tmp_path / "here.json").write_text(first)
    run_cli(["doctor", "--json", "--facts", str(tmp_path / "here.json")])
    assert json.loads(capsys.readouterr().out)["checks"] == json.loads(first)["checks"]


def test_doctor_bad_facts_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["doctor", "--facts", str(tmp_path / "missing.json")]) == 2
    assert "cannot read recorded facts" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"gpu_count": 3}')
    assert run_cli(["doctor", "--facts", str(tmp_path / "bad.json")]) == 2


def test_doctor_model_cannot_combine_with_recorded_facts(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["doctor", "--model", "x", "--facts", str(MACHINES / "cpu_only.json")]) == 2
    assert "--model" in capsys.readouterr().err


def test_doctor_with_a_missing_model_fails_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["doctor", "--model", str(tmp_path / "no-such-model"), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    model_line = [line for line in out.splitlines() if line.startswith("fail  model")]
    assert model_line, out
    assert "Traceback" not in out


def test_doctor_model_checks_all_three_bge_m3_outputs(m3_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["doctor", "--json", "--model", str(m3_checkpoint), "--device", "cpu", "--dtype", "fp32"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = report["checks"][-1]
    assert model["name"] == "model" and model["status"] == "ok", model
    assert "on cpu (fp32)" in model["evidence"]
    assert "finite, norm 1.0" in model["evidence"]
    assert "sparse" in model["evidence"] and "colbert" in model["evidence"]


def test_doctor_model_names_the_dtype_auto_picked(
    m3_checkpoint: Path, capsys: pytest.CaptureFixture[str], cpu_class
) -> None:
    """Without --dtype the model loads at auto, and the evidence says what auto resolved to on this CPU class."""
    from bgeserve.runtime.devices import auto_dtype

    assert run_cli(["doctor", "--json", "--model", str(m3_checkpoint), "--device", "cpu"]) == 0
    model = json.loads(capsys.readouterr().out)["checks"][-1]
    assert model["name"] == "model" and model["status"] == "ok", model
    assert auto_dtype("cpu")[0] == cpu_class.auto_dtype
    assert f"on cpu ({cpu_class.auto_dtype})" in model["evidence"]
    assert "finite, norm 1.0" in model["evidence"]


def test_doctor_model_on_a_missing_gpu_fails_with_the_reason(
    m3_checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this holds on any machine.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code = (
        "import sys; from bgeserve.cli import main; "
        f"sys.exit(main(['doctor', '--model', {str(m3_checkpoint)!r}, '--device', 'cuda']))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "fail  model" in done.stdout and "DeviceUnavailable" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_env_without_action_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["env"]) == 2
    assert "snapshot" in capsys.readouterr().err


def test_env_diff_of_a_missing_snapshot_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["env", "diff", str(tmp_path / "nothing.txt")]) == 2
    assert "no snapshot at" in capsys.readouterr().err


def test_env_with_a_missing_interpreter_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.txt"
    assert run_cli(["env", "snapshot", "--out", str(out), "--python", str(tmp_path / "nopython")]) == 2
    assert "cannot run" in capsys.readouterr().err
    assert not out.exists()


def test_cli_module_import_does_not_import_torch() -> None:
    code = (
        "import sys, bgeserve.cli.ops, bgeserve.ops.doctor, bgeserve.ops.environment; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'onnxruntime' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
