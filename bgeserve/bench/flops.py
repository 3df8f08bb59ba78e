"""How much of the device's matrix-product rate a row turns into embeddings.

A row's model rate is its tokens/s times the encoder's projection FLOPs per token (QKV, attention output
and both feed-forward products: ~0.61 GFLOP for bge-m3, the figure issue 5 uses; attention scores and the
heads are left out, so the share is a slight underestimate). The device rate is one large matrix product
in the row's own precision, timed in the row's process. Their ratio is the `matmul use` the GPU bar asks
for (>= 50% of the card's bf16 rate on 512-token batches).
"""

from __future__ import annotations

import time

from bgeserve.models.config import EncoderConfig

# A product big enough to reach a GPU's peak (8192^3: ~1.1 TFLOP, ~1.4 ms on an H200 in bf16).
CUDA_MATMUL_SIZE = 8192
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def projection_flops_per_token(config: EncoderConfig) -> float:
    """2 x the multiply-adds of every layer's four projections for one token."""
    hidden, inner = config.hidden_size, config.intermediate_size
    per_layer = 4 * hidden * hidden + 2 * hidden * inner
    return 2.0 * config.num_layers * per_layer


def measure_matmul_tflops(device: str, dtype: str, size: int = CUDA_MATMUL_SIZE, repeats: int = 10) -> float | None:
    """TFLOP/s of a size x size x size product on `device` in `dtype` (fp32/fp16/bf16), best of a few
    timings after a warm-up; None for a dtype with no such product here (int8)."""
    import torch

    if dtype not in _TORCH_DTYPES:
        return None
    torch_dtype = getattr(torch, _TORCH_DTYPES[dtype])
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

