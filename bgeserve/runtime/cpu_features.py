"""What this CPU has (feature flags) and how fast it multiplies matrices in a precision (a start-up probe).

The precision and kernel choices (`runtime.devices.auto_dtype`, the int8 weight encoding of the ONNX
export) are made from these; tests stand in other CPUs by replacing `cpu_capabilities`, `cpu_flags`,
`matmul_rate`, `int8_product_rate` and `onednn_int8_exact`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Collection, Mapping

import torch

from bgeserve.runtime.cpu_info import NATIVE_BF16_FLAGS, VNNI_FLAGS, cpu_flags
from bgeserve.runtime.cpu_linear import PackedWeightLinear, onednn_linear_available
from bgeserve.runtime.token_int8 import onednn_int8_available, onednn_int8_product

log = logging.getLogger(__name__)


def cpu_capabilities() -> Mapping[str, object]:
    """This CPU's features as torch detects them (`avx2`, `avx512_bf16`, `amx_bf16`, ... -> bool)."""
    return torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}


def cpu_has_native_bf16(capabilities: Mapping[str, object] | None = None) -> bool:
    """AVX512-BF16 or AMX: the CPU features that make bf16 matrix products faster than fp32.
    `capabilities`: feature -> present, as cpu_capabilities() gives them (the default)."""
    caps = cpu_capabilities() if capabilities is None else capabilities
    return any(caps.get(flag) for flag in NATIVE_BF16_FLAGS)


def cpu_has_vnni(flags: Collection[str] | None = None) -> bool:
    """True when the CPU multiplies u8 x s8 without 16-bit saturation (AVX512-VNNI, AVX-VNNI, AMX).
    `flags`: /proc/cpuinfo's, as cpu_flags() reads them (the default)."""
    return bool(set(cpu_flags() if flags is None else flags) & VNNI_FLAGS)


def exact_int8_products(flags: Collection[str] | None = None) -> bool:
    """True where oneDNN's u8 x s8 products are exact, the torch int8 path's per-token kernel: VNNI or AMX
    in `flags` (/proc/cpuinfo's, the default) and oneDNN's product checked on a saturating input here."""
    return cpu_has_vnni(flags) and onednn_int8_exact()


@functools.cache  # a fact of this machine and process
def onednn_int8_exact() -> bool:
    """Whether oneDNN's u8 x s8 product is exact where pairs of products pass 16 bits (255 x 127 x 2), on
    bge-m3-like shapes: AVX2's instruction saturates them, VNNI's and AMX's do not; oneDNN held to an
    older instruction set (ONEDNN_MAX_CPU_ISA) saturates on any CPU."""
    if not onednn_int8_available():
        return False
    rows, depth, cols = 32, 1024, 64
    codes = torch.full((rows, depth), 255, dtype=torch.uint8)
    weight = torch.full((cols, depth), 127, dtype=torch.int8)
    product = onednn_int8_product(codes, torch.ops.onednn.qlinear_prepack(weight, None), torch.ones(cols))
    return bool((product == 255 * 127 * depth).all())  # 33,162,240: even, below 2^25, so exact in fp32


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
    with torch.inference_mode():
        return 2 * rows * size * 4 * size / _best_seconds(lambda: run(x), repeats)


def _best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `run`, after one untimed warm-up call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def int8_product_rate(rows: int = 256, size: int = 1024, repeats: int = 3) -> float | None:
    """Integer ops/s of one [rows, size] x [size, 4 size] u8 x int8 product through onnxruntime's
    MatMulIntegerToFloat, the kernel of the int8 backend, with the weight encoding it picks for this CPU
    (s8 with VNNI, u8 without); best of `repeats`. None without onnxruntime and onnx (the onnx extra), or
    when this onnxruntime cannot run the graph: the measurement only feeds a log line."""
    try:
        return _timed_int8_product(rows, size, repeats)
    except ImportError:
        return None
    except Exception as exc:  # noqa: BLE001 - an older onnxruntime or a missing contrib op: no measurement
        log.debug("int8 product rate not measured: %s", exc)
        return None


def _timed_int8_product(rows: int, size: int, repeats: int) -> float:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from bgeserve.runtime.onnx_int8 import stored_weights

    gen = np.random.default_rng(0)
    weight, zero_point = stored_weights(gen.integers(-127, 128, (size, 4 * size)).astype(np.int8), cpu_has_vnni())
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.array(1, np.float32), "a_scale"),
        numpy_helper.from_array(np.full(4 * size, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(zero_point, "w_zp"),
    ]
    node = helper.make_node("MatMulIntegerToFloat", ["x", "w", "a_scale", "w_scale", "", "w_zp"], ["y"],
                            domain="com.microsoft")
    graph = helper.make_graph(
        [node], "int8_rate", [helper.make_tensor_value_info("x", TensorProto.UINT8, [rows, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 4 * size])], inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    # IR 8 (opset 17's): the oldest onnxruntime bgeserve admits reads it, whatever onnx wrote by default.
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the threads the backends are given
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": gen.integers(0, 256, (rows, size), dtype=np.uint8)}
    return 2 * rows * size * 4 * size / _best_seconds(lambda: session.run(None, feed), repeats)
