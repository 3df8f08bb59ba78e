"""What this CPU has (feature flags) and how fast it multiplies matrices in a precision (a start-up probe).

The precision and kernel choices (`runtime.devices.auto_dtype`, the int8 weight encoding of the ONNX
export) are made from these; tests stand in other CPUs by replacing `cpu_capabilities`, `cpu_flags` and
`matmul_rate`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import torch

from bgeserve.runtime.cpu_linear import PackedWeightLinear, onednn_linear_available


def cpu_capabilities() -> Mapping[str, object]:
    """This CPU's features as torch detects them (`avx2`, `avx512_bf16`, `amx_bf16`, ... -> bool)."""
    return torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}


def cpu_has_native_bf16(capabilities: Mapping[str, object] | None = None) -> bool:
    """AVX512-BF16 or AMX: the CPU features that make bf16 matrix products faster than fp32.
    `capabilities`: feature -> present, as cpu_capabilities() gives them (the default)."""
    caps = cpu_capabilities() if capabilities is None else capabilities
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


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


def cpu_has_vnni(flags: Collection[str] | None = None) -> bool:
    """True when the CPU multiplies u8 x s8 without 16-bit saturation (AVX512-VNNI, AVX-VNNI, AMX).
    `flags`: /proc/cpuinfo's, as cpu_flags() reads them (the default)."""
    return bool(set(cpu_flags() if flags is None else flags) & {"avx512_vnni", "avx_vnni", "amx_int8"})


def matmul_rate(dtype: torch.dtype, rows: int = 256, size: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of one [rows, size] x [size, 4 size] product in `dtype` on this CPU, through the same kernel
    the torch backend uses (oneDNN with a pre-packed weight where there is one); best of `repeats`."""
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(size, 4 * size).to(dtype)
    x = torch.randn(rows, size, generator=gen).to(dtype)
    run: Callable[[torch.Tensor], torch.Tensor] = linear
    if onednn_linear_available():
        # Without a oneDNN kernel for this dtype here, torch's default one is what runs.
        with contextlib.suppress(RuntimeError):
            run = PackedWeightLinear(linear)
    best = float("inf")
    with torch.inference_mode():
        run(x)
        for _ in range(repeats):
            start = time.perf_counter()
            run(x)
            best = min(best, time.perf_counter() - start)
    return 2 * rows * size * 4 * size / max(best, 1e-9)
