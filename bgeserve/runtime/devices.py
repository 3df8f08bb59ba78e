"""Device and precision choice: `auto` means CUDA when present, else CPU; for precision see auto_dtype()."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from bgeserve.errors import DeviceUnavailable
from bgeserve.runtime import cpu_features
from bgeserve.runtime.cpu_info import BF16_MIN_SPEEDUP

log = logging.getLogger(__name__)

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


# The int8 note needs a clear margin: the start-up products are small and timed on a possibly busy machine.
INT8_NOTE_MIN_SPEEDUP = 1.3
# Over bf16 on AMX tiles it needs more: bf16's products there run so fast that the int8 path's passes
# around its products (row quantisation, epilogues) cost more than its faster products save. On an AMX
# Xeon the probe read int8 at 1.0-1.6x bf16 while whole passes of bge-m3 ran int8 at 0.65x bf16; on
# AVX512-BF16 without AMX 1.0-2.0x read against 1.2-1.5x end to end.
INT8_NOTE_MIN_SPEEDUP_OVER_AMX_BF16 = 2.5


def canonical_dtype(dtype: str | None) -> str:
    """bgeserve's spelling of a precision name (float32 -> fp32, bfloat16 -> bf16, ...); None -> auto."""
    name = (dtype or "auto").strip().lower()
    return _DTYPE_ALIASES.get(name, name)


def resolve_dtype(dtype: str | None, device: str) -> str:
    """'auto' -> auto_dtype(device), logged with its reason; rejects precisions the device cannot run."""
    name = canonical_dtype(dtype)
    if name == "auto":
        choice, why = auto_dtype(device)
        log.info("dtype auto -> %s on %s: %s", choice, device, why)
        return choice
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, fp32, fp16, bf16 or int8")
    if name == "fp16" and device == "cpu":
        raise ValueError("fp16 is for CUDA; on CPU use fp32, bf16 or int8")
    if name == "int8" and device != "cpu":
        raise ValueError("int8 runs on CPU; on CUDA use fp16 or bf16")
    return name


def auto_dtype(device: str) -> tuple[str, str]:
    """What `dtype=auto` runs on `device`, and why (for the log).

    CUDA: bf16 where the GPU has it (Ampere and later), else fp16. CPU: bf16 when the CPU has native bf16
    (AVX512-BF16 / AMX) and a bf16 matrix product measured here is at least BF16_MIN_SPEEDUP x the fp32
    one, else fp32, the exact path. int8 is never automatic: it changes results more than bf16 does.
    """
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", "this GPU has bf16 tensor cores"
        return "fp16", "this GPU has no bf16 tensor cores"
    return _cpu_auto_dtype()


@functools.lru_cache(maxsize=1)
def _cpu_auto_dtype() -> tuple[str, str]:
    # Cached: the measurement is of the machine, which does not change while the process runs (tests that
    # stand in another CPU's features and rates call cache_clear()).
    rate = functools.cache(cpu_features.matmul_rate)  # each precision measured once, for both uses
    choice, why = choose_cpu_dtype(cpu_features.cpu_has_native_bf16(), rate)
    # Where oneDNN's u8 x s8 is exact, the torch int8 path (per-token products, compiled passes) has the
    # higher throughput; elsewhere the onnx graph's exact u8 x u8 products do.
    hint = ("--dtype int8 (without --compile; a C++ compiler for its fused passes)"
            if cpu_features.exact_int8_products() else "--backend onnx --dtype int8")
    amx_bf16 = choice == "bf16" and bool(cpu_features.cpu_capabilities().get("amx_bf16"))
    margin = INT8_NOTE_MIN_SPEEDUP_OVER_AMX_BF16 if amx_bf16 else INT8_NOTE_MIN_SPEEDUP
    note = int8_note(choice, rate, cpu_features.int8_product_rate, hint, margin)
    return choice, f"{why}; {note}" if note else why


def choose_cpu_dtype(native_bf16: bool, rate: Callable[[torch.dtype], float]) -> tuple[str, str]:
    """bf16 only on native-bf16 CPUs where `rate` (FLOP/s) shows it BF16_MIN_SPEEDUP x faster than fp32."""
    if not native_bf16:
        return "fp32", "this CPU has no native bf16 (AVX512-BF16 or AMX): fp32, the exact path, is fastest"
    speedup = rate(torch.bfloat16) / rate(torch.float32)
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16", f"bf16 matrix products measured {speedup:.1f}x fp32 on this CPU"
    return "fp32", f"bf16 matrix products measured only {speedup:.1f}x fp32 on this CPU"


def int8_note(
    choice: str, rate: Callable[[torch.dtype], float], int8_rate: Callable[[], float | None],
    hint: str = "--backend onnx --dtype int8", min_speedup: float = INT8_NOTE_MIN_SPEEDUP,
) -> str | None:
    """A line for the log when the int8 products (`int8_rate`, ops/s) run at least `min_speedup` x those of
    the precision auto chose (`rate`, FLOP/s): int8 (`hint`: the flags that run it) is then likely
    the faster path here, but auto never takes it (it changes results more than bf16: MiniLM's min cosine
    is 0.995-0.998, bf16's 0.9999). None otherwise, or when onnxruntime, which measures the rate, is not installed."""
    measured = int8_rate()
    if measured is None:
        return None
    speedup = measured / rate(DTYPES[choice])
    if speedup < min_speedup:
        return None
    return (
        f"int8 products measured {speedup:.1f}x {choice} here: {hint} is likely faster "
        "(not chosen automatically: it changes results more)"
    )
