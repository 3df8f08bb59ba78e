"""What this CPU is, read from the operating system without torch: its model, its feature flags, and the
class of kernels those flags give it. `bgeserve doctor` reports it even where torch does not import;
`runtime.cpu_features` builds the precision and kernel choices on it.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Collection
from pathlib import Path

# The flags that decide which kernels and precisions are fast here: what a benchmark figure must name.
# Any of these: u8 x s8 products accumulate without 16-bit saturation.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's feature flags in `cpuinfo` (`avx2`, `avx512_vnni`, `amx_int8`, ...); empty when
    unreadable (not Linux)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def speed_flags(flags: Collection[str] | None = None) -> list[str]:
    """Which of SPEED_FLAGS this CPU has, in that order. `flags`: /proc/cpuinfo's (the default)."""
    have = set(cpu_flags() if flags is None else flags)
    return [flag for flag in SPEED_FLAGS if flag in have]


def cpu_model() -> str:
    """The CPU's model name as lscpu gives it, else what Python's platform module knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def cpu_class(flags: Collection[str]) -> tuple[str, str]:
    """The kernel class of a CPU with these flags, and what bgeserve runs there: (name, what it means)."""
    have = set(flags)
    vnni = bool(have & VNNI_FLAGS)
    int8 = ("the onnx int8 backend stores s8 weights (u8 x s8 is exact with VNNI)" if vnni else
            "the onnx int8 backend stores u8 weights (u8 x s8 would saturate without VNNI)")
    if have & {"amx_bf16", "amx_int8"}:
        name = "AMX"
    elif "avx512_bf16" in have:
        name = "AVX512-BF16"
    elif vnni:
        name = "VNNI without native bf16"
    elif "avx2" in have:
        name = "AVX2"
    else:
        name = "older than AVX2"
    if name in ("AMX", "AVX512-BF16"):
        auto = "dtype=auto times bf16 against fp32 products at start-up and takes bf16 where it is faster"
    else:
        auto = "no native bf16: dtype=auto keeps fp32, the exact path"
    if name == "older than AVX2":
        auto = "torch and onnxruntime run their slowest kernels here; " + auto
    return name, f"{auto}; {int8}"
