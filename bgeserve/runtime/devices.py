"""Device and precision choice: `auto` means CUDA when present, else CPU."""

from __future__ import annotations

import torch

from bgeserve.errors import DeviceUnavailable

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "qint8": "int8"}


def resolve_device(spec: str | None) -> str:
    """'auto'/None -> 'cuda:0' when CUDA is usable else 'cpu'; 'cuda' -> 'cuda:0'; checks the index."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device {spec!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                f"run `bgeserve doctor` or use DEVICE=cpu"
            )
        index = 0 if spec == "cuda" else _parse_index(spec)
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {spec!r} does not exist: {torch.cuda.device_count()} GPU(s) visible "
                f"(CUDA_VISIBLE_DEVICES renumbers them from 0)"
            )
        return f"cuda:{index}"
    raise DeviceUnavailable(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")


def _parse_index(spec: str) -> int:
    try:
        return int(spec.split(":", 1)[1])
    except ValueError as exc:
        raise DeviceUnavailable(f"bad device {spec!r}: expected cuda:N") from exc


def resolve_devices(spec: str | None) -> list[str]:
    """A comma list (`cuda:0,cuda:1`) or `auto` (every visible GPU, else CPU) -> device names."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    return [resolve_device(part) for part in spec.split(",") if part.strip()]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU features that make bf16 matrix products faster than fp32."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_dtype(dtype: str | None, device: str) -> str:
    """'auto' -> fp16 on CUDA, fp32 on CPU; rejects precisions the device cannot run."""
    name = (dtype or "auto").strip().lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name == "auto":
        # CPU stays exact (fp32): FlagEmbedding parity is what `auto` promises there. bf16 is opt-in;
        # cpu_has_native_bf16() tells where it pays off.
        return "fp16" if device.startswith("cuda") else "fp32"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, fp32, fp16, bf16 or int8")
    if name == "fp16" and device == "cpu":
        raise ValueError("fp16 is for CUDA; on CPU use fp32, bf16 or int8")
    if name == "int8" and device != "cpu":
        raise ValueError("int8 runs on CPU; on CUDA use fp16 or bf16")
    return name
