"""The passes around each int8 product of `runtime.token_int8`: a row's quantisation before it, the
epilogue after it (row scale, zero point, bias; then GELU, or the residual add and LayerNorm and the next
row quantisation), eager or compiled.

Compiled (torch.compile, Inductor's C++ kernels), each is one pass over memory; `Int8Kernels.build`
compiles every variant a layer of a given shape runs at load, and checks it against the eager
functions. Without a working compiler the same functions run eagerly, at several passes each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from bgeserve.models.config import EncoderConfig

log = logging.getLogger(__name__)

CODES = 255  # u8 activation levels above the row minimum

# The load's warm-up compiles on this many rows: Inductor sizes a dynamic graph's loops by the first
# inputs it sees, and splits a loop among threads only where each gets 512 elements or more
# (`cpp.min_chunk_size`); on a few rows it writes single-threaded kernels that then serve every batch.
# 512 rows of bge-m3's 1,024 features (2^19 elements) cover up to 1,024 threads.
WARM_UP_ROWS = 512
# Graphs a compiled pass may hold (each model's widths, dtypes, one row or several) before Dynamo stops
# compiling it.
WARM_UP_RECOMPILE_LIMIT = 64


def quantize_rows(x: torch.Tensor, smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[rows, K] x [K] channel factors -> u8 codes, each row's scale and zero point ([rows, 1] fp32):
    x * smooth ~ scale * (codes - zero)."""
    xf = x.float() * smooth
    lo = xf.amin(1, keepdim=True).clamp(max=0)
    hi = xf.amax(1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / CODES).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    codes = torch.clamp(torch.round(xf / scale) + zero, 0, CODES).to(torch.uint8)
    return codes, scale, zero


def dequantize(product: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, col_sums: torch.Tensor,
               bias: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The product of the codes -> y, with the rows' scales and zero points and the bias (the formula is in
    `runtime.token_int8`'s docstring)."""
    return (scale * (product - zero * col_sums) + bias).to(out_dtype)


def dequantize_gelu(product: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, col_sums: torch.Tensor,
                    bias: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """`dequantize`, then the exact (erf) GELU, in the same pass."""
    return F.gelu(dequantize(product, scale, zero, col_sums, bias, torch.float32)).to(out_dtype)


def dequantize_norm(product: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, col_sums: torch.Tensor,
                    bias: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, norm_bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """`dequantize` in fp32, plus the residual, then LayerNorm: a post-LN block's step after a product."""
    y = dequantize(product, scale, zero, col_sums, bias, torch.float32) + residual
    return F.layer_norm(y, (y.shape[-1],), weight, norm_bias, eps)


def dequantize_norm_quantize(product: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, col_sums: torch.Tensor,
                             bias: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             norm_bias: torch.Tensor, eps: float,
                             smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dequantize_norm`, and its rows quantised for the next product: (hidden, codes, scale, zero)."""
    hidden = dequantize_norm(product, scale, zero, col_sums, bias, residual, weight, norm_bias, eps)
    return (hidden, *quantize_rows(hidden, smooth))


@dataclass(frozen=True)
class LayerShape:
    """The layer the compiled passes are warmed up for: its row widths (the graphs are specialised on
    them; only the number of rows varies between requests), the dtype Q, K and V go to attention in,
    whether its activation is the exact GELU fused into the epilogue, and its LayerNorms' eps."""

    hidden: int = 1024
    intermediate: int = 4096
    attention_dtype: torch.dtype = torch.bfloat16
    gelu: bool = True
    norm_eps: float = 1e-5

    @classmethod
    def of(cls, cfg: EncoderConfig, attention_dtype: torch.dtype) -> LayerShape:
        return cls(cfg.hidden_size, cfg.intermediate_size, attention_dtype, cfg.hidden_act == "gelu",
                   cfg.layer_norm_eps)


@dataclass(frozen=True)
class Int8Kernels:
    """The functions around each int8 product (compiled into one pass each, or the eager originals), and
    whether the product itself runs on oneDNN or, with `reference`, as the fp32 product of the same codes:
    the arithmetic of VNNI's and AMX's kernels on any CPU, to check the recipe where they are absent."""

    quantize: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    dequantize: Callable[..., torch.Tensor]
    dequantize_gelu: Callable[..., torch.Tensor]
    dequantize_norm: Callable[..., torch.Tensor]
    dequantize_norm_quantize: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    compiled: bool
    reference: bool = False

    @classmethod
    def _of(cls, wrap: Callable[[Callable[..., Any]], Callable[..., Any]], compiled: bool,
            reference: bool = False) -> Int8Kernels:
        """The functions of this module, each as `wrap` makes it."""
        return cls(wrap(quantize_rows), wrap(dequantize), wrap(dequantize_gelu), wrap(dequantize_norm),
                   wrap(dequantize_norm_quantize), compiled=compiled, reference=reference)

    @classmethod
    def eager(cls) -> Int8Kernels:
        """The functions as written: several passes over memory each, no compiler needed."""
        return cls._of(lambda f: f, compiled=False)

    @classmethod
    def reference_products(cls) -> Int8Kernels:
        """Eager functions and fp32 products of the codes (tests, and checking a CPU's kernel)."""
        return cls._of(lambda f: f, compiled=False, reference=True)

    @classmethod
    def build(cls, shape: LayerShape | None = None) -> Int8Kernels:
        """Compiled where torch.compile works here (it needs a C++ compiler): every variant a layer of
        `shape` (default: bge-m3's) runs, on one row or several, is compiled now and checked against the
        eager functions; else the eager ones, with a log line saying so."""
        shape = shape or LayerShape()
        compiled = cls._of(lambda f: torch.compile(f, dynamic=True), compiled=True)
        try:
            # Dynamo keeps a function's graphs on its code object, shared by every model in the process:
            # each width and dtype is a graph of its own, and past the default limit (8) it would run the
            # rest eagerly, silently.
            with torch._dynamo.config.patch(recompile_limit=WARM_UP_RECOMPILE_LIMIT):
                ok = _same_results(compiled, cls.eager(), shape)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            log.info("int8: torch.compile is not usable here (%s); the quantisation runs eagerly, slower",
                     str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return cls.eager()
        if not ok:
            log.info("int8: the compiled quantisation differs from the eager one here; running eagerly")
            return cls.eager()
        return compiled


def _static(tensor: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """`tensor`, its `dims` (all by default) marked static for the compile it is first seen by."""
    for dim in range(tensor.dim()) if dims is None else dims:
        torch._dynamo.mark_static(tensor, dim)
    return tensor


def _same_results(kernels: Int8Kernels, eager: Int8Kernels, shape: LayerShape) -> bool:
    """`kernels` against `eager` on inputs of every variant a layer of `shape` runs: the same codes, and
    the epilogues within fp32 rounding (a fused multiply-add rounds once where the eager passes round
    twice). Tensors are made as a layer's are, so the graphs compiled here are the ones requests hit: its
    constants (channel factors, column sums, bias, LayerNorm weights) as plain tensors made at load, the
    activations and products as inference tensors (requests run under inference_mode; Dynamo guards on
    the difference). Only the rows are dynamic: with the widths symbolic too, Inductor's LayerNorm ran at
    a third of the speed."""
    gen = torch.Generator().manual_seed(0)
    h, f = shape.hidden, shape.intermediate

    def const(*size: int) -> torch.Tensor:
        return _static(torch.rand(*size, generator=gen) + 0.5)

    smooth = {width: const(width) for width in (h, f)}
    col_sums = {width: const(1, width) for width in (h, 3 * h, f)}
    bias = {width: const(width) for width in (h, 3 * h, f)}
    norm = (const(h), const(h), shape.norm_eps)

    def activations(rows: int, width: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        return _static((torch.randn(rows, width, generator=gen) * scale).to(dtype), dims=(1,))

    with torch.inference_mode():
        for rows in (1, WARM_UP_ROWS):
            rows_of = partial(activations, rows)
            # In: the residual stream (Q, K, V's input), attention's context, the feed-forward's middle.
            for x, width in ((rows_of(h), h), (rows_of(h, shape.attention_dtype), h), (rows_of(f), f)):
                got, want = kernels.quantize(x, smooth[width]), eager.quantize(x, smooth[width])
                if not all(torch.equal(a, b) for a, b in zip(got, want, strict=True)):
                    return False
            _, scale, zero = want
            # Out: Q, K and V for attention; the first feed-forward product, with GELU or not.
            ffn_in = (kernels.dequantize_gelu, eager.dequantize_gelu) if shape.gelu else (kernels.dequantize,
                                                                                       eager.dequantize)
            epilogues = ((kernels.dequantize, eager.dequantize, 3 * h, shape.attention_dtype),
                         (*ffn_in, f, torch.float32))
            for fast, slow, width, out_dtype in epilogues:
                terms = (rows_of(width, scale=1e3), scale, zero, col_sums[width], bias[width], out_dtype)
                y, y0 = fast(*terms), slow(*terms)
                tol = 1e-5 if out_dtype == torch.float32 else 1e-2  # bf16: one ulp apart
                if y.dtype != out_dtype or not torch.allclose(y.float(), y0.float(), rtol=tol, atol=tol):
                    return False
            through_norm = (rows_of(h, scale=1e3), scale, zero, col_sums[h], bias[h], rows_of(h))
            if not _same_fused(kernels, eager, through_norm, norm, smooth[h]):
                return False
    return True


def _same_fused(kernels: Int8Kernels, eager: Int8Kernels, terms: tuple[torch.Tensor, ...],
                norm: tuple[torch.Tensor, torch.Tensor, float], smooth: torch.Tensor) -> bool:
    """The epilogues through the residual add and LayerNorm (and the next quantisation), compiled against
    eager. The quantised rows come from values that differ in the last bit, so a code may sit one level
    away."""
    normed = kernels.dequantize_norm(*terms, *norm)
    if not torch.allclose(normed, eager.dequantize_norm(*terms, *norm), rtol=1e-4, atol=1e-4):
        return False
    got, want = (f(*terms, *norm, smooth) for f in (kernels.dequantize_norm_quantize, eager.dequantize_norm_quantize))
    return torch.allclose(got[0], want[0], rtol=1e-4, atol=1e-4) and _codes_agree(got[1:], want[1:])


def _codes_agree(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> bool:
    """(codes, scale, zero) within one level and fp32 rounding of each other."""
    (codes, scale, zero), (codes0, scale0, zero0) = got, want
    return (
        codes.dtype == torch.uint8
        and (codes.int() - codes0.int()).abs().max().item() <= 1
        and (zero - zero0).abs().max().item() <= 1
        and torch.allclose(scale, scale0, rtol=1e-4, atol=0)
    )
