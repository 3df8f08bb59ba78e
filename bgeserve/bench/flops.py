"""How much of the device's matrix-product rate a row turns into embeddings.

A row's model rate is its tokens/s times the encoder's projection FLOPs per token (QKV, attention output
and both feed-forward products: ~0.61 GFLOP for bge-m3; attention scores and the heads are left out, so
the share is a slight underestimate). The device rate is one large matrix product in the row's own
precision, timed in the row's process: on a GPU an 8192^3 product, on the CPU a bge-m3 feed-forward-shaped
one (2048 x 1024 x 4096) through the kernel our torch backend uses, on the row's threads. Their ratio is the
`matmul use` of the speed bars (a GPU's bf16 rate on 512-token batches, a CPU's bf16 rate).
"""

from __future__ import annotations

import time

from bgeserve.core import PRECISION_NAMES
from bgeserve.models.config import EncoderConfig

# A product big enough to reach a GPU's peak (8192^3: ~1.1 TFLOP, ~1.4 ms on an H200 in bf16).
CUDA_MATMUL_SIZE = 8192
# On the CPU: 2048 token rows times a [1024, 4096] weight, bge-m3's first feed-forward product.
CPU_MATMUL_ROWS, CPU_MATMUL_SIZE = 2048, 1024
# Products are timed in the floating-point precisions; int8 has no plain product to time.
_FLOAT = ("fp32", "fp16", "bf16")


def projection_flops_per_token(config: EncoderConfig) -> float:
    """2 x the multiply-adds of every layer's four projections for one token."""
    hidden, inner = config.hidden_size, config.intermediate_size
    per_layer = 4 * hidden * hidden + 2 * hidden * inner
    return 2.0 * config.num_layers * per_layer


def matmul_shape(device: str) -> str:
    """The product measure_matmul_tflops times on `device`, for the table's notes."""
    if device.startswith("cuda"):
        return f"{CUDA_MATMUL_SIZE}^3"
    return f"{CPU_MATMUL_ROWS}x{CPU_MATMUL_SIZE}x{4 * CPU_MATMUL_SIZE}"


def measure_matmul_tflops(device: str, dtype: str, size: int = CUDA_MATMUL_SIZE, repeats: int = 10) -> float | None:
    """TFLOP/s of a size x size x size product on a GPU (the CPU: see matmul_shape) in `dtype`
    (fp32/fp16/bf16), best of a few timings after a warm-up; None for a dtype with no such product (int8)."""
    import torch

    if dtype not in _FLOAT:
        return None
    if not device.startswith("cuda"):
        from bgeserve.runtime.cpu_features import matmul_rate

        rate = matmul_rate(getattr(torch, PRECISION_NAMES[dtype]), rows=CPU_MATMUL_ROWS, size=CPU_MATMUL_SIZE)
        return rate / 1e12
    torch_dtype = getattr(torch, PRECISION_NAMES[dtype])
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    cuda = device.startswith("cuda")

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    timed()  # warm-up: kernel selection, clocks
    seconds = min(timed() for _ in range(3))
    return 2.0 * size**3 * repeats / seconds / 1e12

