"""Accurate int8 linear layers for torch on CPUs with VNNI or AMX: oneDNN's u8 x s8 products, one range per token.

The recipe is the ONNX int8 graph's (`runtime.onnx_int8`: weights s8 per output channel, symmetric; each
activation row quantised to u8 over its own range [min(x, 0), max(x, 0)]) with SmoothQuant's channel
scaling before the rows are quantised (x / t_j into the quantisation, W * t_j into the codes, t calibrated
at load on a few texts, `int8.smoothing_scales`): BERT's outlier channels otherwise set every row's range,
and moving them into the weights lifts all-MiniLM-L6-v2's min dense cosine from ~0.995 (the ONNX graph's,
unsmoothed) to 0.998. The codes w below are those of W * t. oneDNN's int8 linear takes one activation
scale and zero point per tensor, so it runs with scale 1 and zero point 0 and the per-row terms are
applied to its fp32 output:

    y_mn = a_m * (P_mn - z_m * c_n) + b_n,   P = q @ (w * s)^T,   c_n = s_n * sum_k w_nk

with a_m, z_m the row's scale and zero point, w the weight codes and s their per-channel scales. u8 x s8
is exact only where the CPU multiplies without 16-bit saturation (VNNI, AMX): elsewhere this recipe is
not used (`cpu_features.exact_int8_products`, which probes it at load).

Each layer (`TokenInt8EncoderLayer`) runs what lies between two products in as few passes over memory as
pay when compiled (torch.compile, Inductor's C++ kernels): a product's epilogue with the residual add and
LayerNorm after it and, after the attention output's product, the row quantisation of the next product's
input too. Without a working compiler the same functions run eagerly, at several passes each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from bgeserve.models.config import EncoderConfig
from bgeserve.models.encoder import PROJECTIONS, Attention, EncoderLayer, TransformerEncoder
from bgeserve.runtime.int8 import smoothing_scales
from bgeserve.runtime.memory import release_freed_memory

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

# What each projection hands on: Q, K and V to attention (bf16 where the CPU has it natively), the rest
# to the fp32 residual stream; ffn_in in fp32 too: a bf16 output there was no faster, nor closer to fp32.
_ATTENTION_INPUTS = frozenset({"qkv"})


def onednn_int8_available() -> bool:
    """Whether this torch build has oneDNN's int8 linear ops (x86 CPU builds do)."""
    ops = torch.ops.onednn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "qlinear_prepack") and hasattr(
        ops, "qlinear_pointwise"
    )


def onednn_int8_product(codes: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                        zero_points: torch.Tensor | None = None) -> torch.Tensor:
    """u8 `codes` (scale 1, zero point 0) @ (`packed` s8 weight x per-output-channel `scales`)^T, in fp32.
    `zero_points`: the weight's, all 0 (symmetric), as a long tensor of the scales' length."""
    if zero_points is None:
        zero_points = torch.zeros(scales.numel(), dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, 0, packed, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
    )


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
    """The product of the codes -> y, with the rows' scales and zero points and the bias (module docstring)."""
    return (scale * (product - zero * col_sums) + bias).to(out_dtype)


def dequantize_gelu(product: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, col_sums: torch.Tensor,
                    bias: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """`dequantize`, then the exact (erf) GELU, in the same pass."""
    return F.gelu(scale * (product - zero * col_sums) + bias).to(out_dtype)


def dequantize_norm(product: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, col_sums: torch.Tensor,
                    bias: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, norm_bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """`dequantize` in fp32, plus the residual, then LayerNorm: a post-LN block's step after a product."""
    y = scale * (product - zero * col_sums) + bias + residual
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
            _, scale, zero = (_static(t, dims=(1,)) for t in want)
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


class TokenInt8Linear(nn.Module):
    """y = x W^T + b (then GELU with `gelu`) with W as s8 codes per output channel and x quantised per row.

    Built from the codes (`from_linear` quantises an nn.Linear); `out_dtype` is what the layer after it
    reads (the residual stream's fp32, or the attention's compute dtype); `smooth` multiplies each input
    channel before quantisation (1 / t, the SmoothQuant factor the codes already carry)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 kernels: Int8Kernels, out_dtype: torch.dtype = torch.float32, gelu: bool = False,
                 smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.kernels = kernels
        self.out_dtype = out_dtype
        self.gelu = gelu
        # Plain attributes, not buffers: Module.to(dtype) must never cast the codes or oneDNN's packed copy.
        codes = codes.to(torch.int8)
        self.scales = scales.float()
        self.packed = torch.ops.onednn.qlinear_prepack(codes, None)
        # The codes themselves only for the reference products: oneDNN reads its packed copy.
        self.codes = codes if kernels.reference else None
        self.zero_points = torch.zeros(self.out_features, dtype=torch.long)
        self.col_sums = (codes.float().sum(1) * self.scales).unsqueeze(0)
        self.bias = (bias.detach().float() if bias is not None else torch.zeros(self.out_features)).clone()
        self.smooth = smooth.float().clone() if smooth is not None else torch.ones(self.in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernels: Int8Kernels, out_dtype: torch.dtype = torch.float32,
                    gelu: bool = False, input_max: torch.Tensor | None = None) -> TokenInt8Linear:
        """`linear`'s weight as s8 codes, each output channel scaled by its largest |w| / 127; with
        `input_max` (each input channel's largest |x| on calibration texts) smoothed first."""
        weight = linear.weight.detach().float()
        smooth = None
        if input_max is not None:
            channel_scales = smoothing_scales(input_max.float(), weight)
            weight, smooth = weight * channel_scales, 1.0 / channel_scales
        scales = (weight.abs().amax(1) / 127).clamp(min=1e-12)
        codes = torch.round(weight / scales[:, None]).clamp(-127, 127)
        return cls(codes, scales, linear.bias, kernels, out_dtype, gelu, smooth)

    def product(self, codes: torch.Tensor) -> torch.Tensor:
        """P = codes @ (w * s)^T in fp32, for u8 `codes` [rows, in_features] (scale 1, zero point 0)."""
        if self.codes is not None:
            return codes.float() @ (self.codes.float() * self.scales[:, None]).T
        return onednn_int8_product(codes, self.packed, self.scales, self.zero_points)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        codes, scale, zero = self.kernels.quantize(rows, self.smooth)
        finish = self.kernels.dequantize_gelu if self.gelu else self.kernels.dequantize
        y = finish(self.product(codes), scale, zero, self.col_sums, self.bias, self.out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class TokenInt8EncoderLayer(nn.Module):
    """An encoder layer (`models.encoder.EncoderLayer`'s block) on TokenInt8Linear projections, whose
    epilogues run fused with what follows them: after the attention output's product, the residual add,
    LayerNorm and the quantisation of the feed-forward's input; after the second feed-forward product,
    the residual add and LayerNorm. Seven compiled passes a layer, where the projections alone take
    eight and four eager ones around them (bge-m3: 120 calls fewer a forward pass)."""

    def __init__(self, layer: EncoderLayer, projections: Mapping[str, TokenInt8Linear], kernels: Int8Kernels) -> None:
        super().__init__()
        self.num_heads, self.head_dim = layer.num_heads, layer.head_dim
        self.qkv, self.attn_out, self.ffn_in, self.ffn_out = (projections[name] for name in PROJECTIONS)
        self.attn_norm, self.ffn_norm = layer.attn_norm, layer.ffn_norm
        # Their weights as plain tensors (views of the modules' own, fixed at load): the compiled passes
        # guard on the type, and were warmed up on plain tensors.
        self._attn_norm, self._ffn_norm = (_norm_terms(norm) for norm in (layer.attn_norm, layer.ffn_norm))
        self.act = layer.act  # run between the feed-forward products where it is not the fused GELU
        self.kernels = kernels

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """The padded layout, [batch, seq, hidden] with a key mask, as EncoderLayer.forward."""
        b, n, h = hidden.shape
        q, k, v = self.qkv(hidden).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(b * n, h)
        return self._after_attention(ctx, hidden.reshape(b * n, h)).view(b, n, h)

    def forward_packed(self, hidden: torch.Tensor, attend: Attention, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Packed tokens [T, hidden], as EncoderLayer.forward_packed (`rows`: only those go on past attention)."""
        ctx = attend(self.qkv(hidden).view(-1, 3, self.num_heads, self.head_dim))
        if rows is not None:
            ctx, hidden = ctx[rows], hidden[rows]
        return self._after_attention(ctx, hidden)

    def _after_attention(self, ctx: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Attention's context [rows, hidden] and the residual stream -> the layer's output, fp32."""
        k, out, ffn_in, ffn_out = self.kernels, self.attn_out, self.ffn_in, self.ffn_out
        codes, scale, zero = k.quantize(ctx, out.smooth)
        hidden, codes, scale, zero = k.dequantize_norm_quantize(
            out.product(codes), scale, zero, out.col_sums, out.bias, hidden, *self._attn_norm, ffn_in.smooth
        )
        # GELU and the quantisation after it stay two passes: fused, Inductor computes the erf twice
        # (once for the rows' ranges, once for their codes), which costs more than the pass it saves.
        terms = (ffn_in.product(codes), scale, zero, ffn_in.col_sums, ffn_in.bias, torch.float32)
        inner = k.dequantize_gelu(*terms) if ffn_in.gelu else self.act(k.dequantize(*terms))
        codes, scale, zero = k.quantize(inner, ffn_out.smooth)
        return k.dequantize_norm(ffn_out.product(codes), scale, zero, ffn_out.col_sums, ffn_out.bias, hidden,
                                 *self._ffn_norm)


def _norm_terms(norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A LayerNorm's (weight, bias, eps), the weights as plain tensors sharing the module's."""
    return norm.weight.detach(), norm.bias.detach(), norm.eps


def quantize_encoder_token_int8(encoder: TransformerEncoder, kernels: Int8Kernels, attention_dtype: torch.dtype,
                                activation: str, input_maxima: Mapping[str, torch.Tensor] | None = None) -> None:
    """Replaces every encoder layer by a TokenInt8EncoderLayer on its projections, in place. The residual
    stream and LayerNorms stay fp32; Q, K and V come out in `attention_dtype` (bf16 where the CPU has
    native bf16: the fused attention kernel's fast path); an exact GELU runs in the first feed-forward
    product's epilogue (other activations after it). `input_maxima` (`int8.input_maxima`'s, keyed
    "layer.projection") smooths each projection; without them none is."""
    fuse_gelu = activation == "gelu"
    # One layer at a time, each released as its int8 one replaces it: a list of them all would hold every
    # fp32 weight until the end (1.2 GB for bge-m3).
    for i in range(len(encoder.layers)):
        layer = cast(EncoderLayer, encoder.layers[i])
        projections: dict[str, TokenInt8Linear] = {}
        for name in PROJECTIONS:
            out_dtype = attention_dtype if name in _ATTENTION_INPUTS else torch.float32
            gelu = fuse_gelu and name == "ffn_in"
            input_max = input_maxima[f"{i}.{name}"] if input_maxima is not None else None
            projections[name] = TokenInt8Linear.from_linear(getattr(layer, name), kernels, out_dtype, gelu, input_max)
        encoder.layers[i] = TokenInt8EncoderLayer(layer, projections, kernels)
        del layer, projections
        release_freed_memory()  # else the fp32 weights just freed stay resident (1.2 GB more for bge-m3)
