"""What this CPU is, read from the operating system without torch: its model, its feature flags, and the
class of kernels those flags give it. `bgeserve doctor` reports it even where torch does not import;
`runtime.cpu_features` builds the precision and kernel choices on it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Collection
from pathlib import Path

# Any of these: u8 x s8 products accumulate without 16-bit saturation.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# Either: bf16 matrix products run natively, so `dtype=auto` measures them against fp32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# bf16 must beat fp32 by this much in `dtype=auto`'s start-up measurement to be chosen: below it the small
# loss of precision buys too little.
BF16_MIN_SPEEDUP = 1.3
# The flags that decide which kernels and precisions are fast here: what a benchmark figure must name.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's feature flags in `cpuinfo` (`avx2`, `avx512_vnni`, `amx_int8`, ...); empty when
    unreadable (not Linux)."""
    return frozenset(_cpuinfo_field(cpuinfo, "flags").split())


def speed_flags(flags: Collection[str] | None = None) -> list[str]:
    """Which of SPEED_FLAGS this CPU has, in that order. `flags`: /proc/cpuinfo's (the default)."""
    have = set(cpu_flags() if flags is None else flags)
    return [flag for flag in SPEED_FLAGS if flag in have]


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name: /proc/cpuinfo's, else lscpu's, else what Python's platform module knows."""
    name = _cpuinfo_field(cpuinfo, "model name")
    if name:
        return name
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, errors="replace", timeout=10,
                             check=False, env={**os.environ, "LC_ALL": "C"}).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.partition(":")[2].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _cpuinfo_field(cpuinfo: str | Path, key: str) -> str:
    """The first `key : value` line's value in a /proc/cpuinfo-style file; "" when absent or unreadable."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as info:
            for line in info:
                name, colon, value = line.partition(":")
                if colon and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_class(flags: Collection[str]) -> tuple[str, str]:
    """The kernel class of a CPU with these flags, and what bgeserve runs there: (name, what it means)."""
    have = set(flags)
    vnni = bool(have & VNNI_FLAGS)
    int8 = ("torch int8 runs per-token u8 x s8 products on oneDNN (once a probe at load finds them exact) and "
            "the onnx int8 backend stores s8 weights (u8 x s8 is exact with VNNI)" if vnni else
            "torch int8 runs SmoothQuant-scaled rows through torch's dynamic int8 kernel and the onnx int8 backend "
            "stores u8 weights (u8 x s8 would saturate without VNNI)")
    if have & NATIVE_BF16_FLAGS:
        name = "AMX" if have & {"amx_bf16", "amx_int8"} else "AVX512-BF16"
        auto = ("native bf16: dtype=auto times bf16 against fp32 products at start-up and takes bf16 where it "
                f"measures at least {BF16_MIN_SPEEDUP}x")
    else:
        name = "VNNI without native bf16" if vnni else "AVX2" if "avx2" in have else "older than AVX2"
        auto = "no native bf16: dtype=auto keeps fp32, the exact path"
    return name, f"{auto}; {int8}"
