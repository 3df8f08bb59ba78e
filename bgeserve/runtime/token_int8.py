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
pay (`runtime.int8_passes`): a product's epilogue with the residual add and LayerNorm after it and, after
the attention output's product, the row quantisation of the next product's input too. Where torch.compile
works, everything after attention (three products and those passes) is one graph the layers share
(`fused_after_attention`): one call a layer where the passes take five, and a lone query ~10% faster.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from bgeserve.models.encoder import PROJECTIONS, Attention, EncoderLayer, TransformerEncoder
from bgeserve.runtime.int8 import smoothing_scales
from bgeserve.runtime.int8_passes import WARM_UP_RECOMPILE_LIMIT, WARM_UP_ROWS, Int8Kernels
from bgeserve.runtime.memory import release_freed_memory

log = logging.getLogger(__name__)

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
    if torch.compiler.is_compiling():
        return cast(torch.Tensor, torch.ops.bgeserve.onednn_int8_product(codes, packed, scales, zero_points))
    return _qlinear(codes, packed, scales, zero_points)


def _qlinear(codes: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
             zero_points: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, 0, packed, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
    )


# The product as an op opaque to torch.compile: Inductor lowers oneDNN's int8 linear only with the packed
# weight frozen into the graph as a constant, a graph per layer; opaque, one graph serves every layer and
# the product runs as it does eagerly.
@torch.library.custom_op("bgeserve::onednn_int8_product", mutates_args=())
def _opaque_int8_product(codes: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                         zero_points: torch.Tensor) -> torch.Tensor:
    return _qlinear(codes, packed, scales, zero_points)


@_opaque_int8_product.register_fake
def _(codes: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    return codes.new_empty((codes.shape[0], scales.shape[0]), dtype=torch.float32)


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
    the residual add and LayerNorm. Everything after attention (three products and the passes between
    them) runs as `after_attention`: one compiled graph where `fused_after_attention` made one, else the
    passes one call each (seven compiled passes a layer in all)."""

    def __init__(self, layer: EncoderLayer, projections: Mapping[str, TokenInt8Linear], kernels: Int8Kernels) -> None:
        super().__init__()
        self.after_attention: AfterAttention = partial(after_attention, passes=kernels)
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
        return self.after_attention(self, ctx, hidden)


class AfterAttention(Protocol):
    """A layer's steps from attention's context to its output (`after_attention`, with its passes bound)."""

    def __call__(self, layer: TokenInt8EncoderLayer, ctx: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor: ...


def after_attention(layer: TokenInt8EncoderLayer, ctx: torch.Tensor, hidden: torch.Tensor,
                    passes: Int8Kernels) -> torch.Tensor:
    """Attention's context [rows, hidden] and the residual stream -> `layer`'s output, fp32, with `passes`
    around the products."""
    k, out, ffn_in, ffn_out = passes, layer.attn_out, layer.ffn_in, layer.ffn_out
    codes, scale, zero = k.quantize(ctx, out.smooth)
    hidden, codes, scale, zero = k.dequantize_norm_quantize(
        out.product(codes), scale, zero, out.col_sums, out.bias, hidden, *layer._attn_norm, ffn_in.smooth
    )
    # Compiled one pass each, GELU and the quantisation after it stay two: fused alone, Inductor computes
    # the erf twice (once for the rows' ranges, once for their codes), which costs more than the pass saves.
    terms = (ffn_in.product(codes), scale, zero, ffn_in.col_sums, ffn_in.bias, torch.float32)
    inner = k.dequantize_gelu(*terms) if ffn_in.gelu else layer.act(k.dequantize(*terms))
    codes, scale, zero = k.quantize(inner, ffn_out.smooth)
    return k.dequantize_norm(ffn_out.product(codes), scale, zero, ffn_out.col_sums, ffn_out.bias, hidden,
                             *layer._ffn_norm)


_EAGER_PASSES = Int8Kernels.eager()


def _after_attention_in_one_graph(layer: TokenInt8EncoderLayer, ctx: torch.Tensor,
                                  hidden: torch.Tensor) -> torch.Tensor:
    """`after_attention` on the passes as written, for torch.compile to trace into one graph."""
    return after_attention(layer, ctx, hidden, _EAGER_PASSES)


def fused_after_attention(layer: TokenInt8EncoderLayer) -> AfterAttention | None:
    """`after_attention` compiled into one graph (the passes fused by Inductor, the products oneDNN's), warmed
    up on `layer` at the widths and dtypes requests bring, one row and many, and checked against the passes
    one call each; None where it does not compile or differs. A model's layers share it: each layer's
    tensors are inputs to the graph, not constants of it."""
    if not layer.kernels.compiled:
        return None
    step = cast(AfterAttention, torch.compile(_after_attention_in_one_graph))
    gen = torch.Generator().manual_seed(0)
    width = layer.attn_out.in_features
    try:
        with torch._dynamo.config.patch(recompile_limit=WARM_UP_RECOMPILE_LIMIT), torch.inference_mode():
            # Many rows first, their count marked dynamic: Inductor shapes the graph's loops (and how it
            # splits them among threads) by the inputs it is first compiled on. One row gets a graph of its own.
            for rows in (WARM_UP_ROWS, 1):
                ctx = torch.randn(rows, width, generator=gen).to(layer.qkv.out_dtype)
                hidden = torch.randn(rows, width, generator=gen)
                if rows > 1:
                    torch._dynamo.mark_dynamic(ctx, 0)
                    torch._dynamo.mark_dynamic(hidden, 0)
                # Against the eager passes: the compiled ones must not see these inputs (rows and widths
                # both dynamic), which would add a slower graph that requests then hit.
                if not _close_rows(step(layer, ctx, hidden), after_attention(layer, ctx, hidden, _EAGER_PASSES)):
                    log.info("int8: the layer's steps compiled into one graph differ from its passes here; "
                             "running the passes")
                    return None
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: run the passes one call each
        log.info("int8: the layer's steps do not compile into one graph here (%s); running its passes",
                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return step


def _close_rows(got: torch.Tensor, want: torch.Tensor) -> bool:
    """A layer's output from one graph against the passes': each row's cosine >= 0.9999 (values a last bit
    apart may quantise a level apart in the products that follow), nothing non-finite."""
    return bool(
        got.shape == want.shape and got.dtype == want.dtype and torch.isfinite(got).all()
        and F.cosine_similarity(got, want, dim=1).min() >= 0.9999
    )


def _norm_terms(norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A LayerNorm's (weight, bias, eps), the weights as plain tensors sharing the module's."""
    return norm.weight.detach(), norm.bias.detach(), norm.eps


def quantize_encoder_token_int8(encoder: TransformerEncoder, kernels: Int8Kernels, attention_dtype: torch.dtype,
                                activation: str, input_maxima: Mapping[str, torch.Tensor] | None = None) -> bool:
    """Replaces every encoder layer by a TokenInt8EncoderLayer on its projections, in place; True when their
    steps after attention run as one compiled graph (`fused_after_attention`). The residual
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
    int8_layers = [cast(TokenInt8EncoderLayer, layer) for layer in encoder.layers]
    step = fused_after_attention(int8_layers[0]) if int8_layers else None
    if step is None:
        return False
    for int8_layer in int8_layers:
        int8_layer.after_attention = step
    return True
