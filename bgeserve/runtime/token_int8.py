"""Accurate int8 linear layers for torch on CPUs with VNNI or AMX: oneDNN's u8 x s8 products, one range per token.

The recipe is the ONNX int8 graph's (`runtime.onnx_int8`), which keeps all-MiniLM-L6-v2's min dense cosine
above 0.995: weights s8 per output channel (symmetric), each activation row quantised to u8 over its own
range [min(x, 0), max(x, 0)]. oneDNN's int8 linear takes one activation scale and zero point per tensor,
so it runs with scale 1 and zero point 0 and the per-row terms are applied to its fp32 output:

    y_mn = a_m * (P_mn - z_m * c_n) + b_n,   P = q @ (w * s)^T,   c_n = s_n * sum_k w_nk

with a_m, z_m the row's scale and zero point, w the weight codes and s their per-channel scales. u8 x s8
is exact only where the CPU multiplies without 16-bit saturation (VNNI, AMX): elsewhere this recipe is
not used (`cpu_features.exact_int8_products`).

Quantising the rows and the epilogue are each one pass over memory when compiled (torch.compile, Inductor's
C++ kernels); without a working compiler the same functions run eagerly, at several passes each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from bgeserve.models.encoder import PROJECTIONS, EncoderLayer, TransformerEncoder
from bgeserve.runtime.cpu_linear import onednn_int8_product

log = logging.getLogger(__name__)

CODES = 255  # u8 activation levels above the row minimum


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[rows, K] -> u8 codes, each row's scale and zero point ([rows, 1] fp32): x ~ scale * (codes - zero)."""
    xf = x.float()
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


@dataclass(frozen=True)
class Int8Kernels:
    """The functions around each int8 product (compiled into one pass each, or the eager originals), and
    whether the product itself runs on oneDNN or, with `reference`, as the fp32 product of the same codes:
    the arithmetic of VNNI's and AMX's kernels on any CPU, to check the recipe where they are absent."""

    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    dequantize: Callable[..., torch.Tensor]
    dequantize_gelu: Callable[..., torch.Tensor]
    compiled: bool
    reference: bool = False

    @classmethod
    def eager(cls) -> Int8Kernels:
        return cls(quantize_rows, dequantize, dequantize_gelu, compiled=False)

    @classmethod
    def reference_products(cls) -> Int8Kernels:
        return cls(quantize_rows, dequantize, dequantize_gelu, compiled=False, reference=True)

    @classmethod
    def build(cls) -> Int8Kernels:
        """Compiled where torch.compile works here (it needs a C++ compiler), checked on a tiny product
        against the eager functions; else the eager ones, with a log line saying so."""
        compiled = cls(
            torch.compile(quantize_rows, dynamic=True),
            torch.compile(dequantize, dynamic=True),
            torch.compile(dequantize_gelu, dynamic=True),
            compiled=True,
        )
        try:
            ok = _same_results(compiled, cls.eager())
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            log.info("int8: torch.compile is not usable here (%s); the quantisation runs eagerly, slower",
                     str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return cls.eager()
        if not ok:
            log.info("int8: the compiled quantisation differs from the eager one here; running eagerly")
            return cls.eager()
        return compiled


def _same_results(kernels: Int8Kernels, eager: Int8Kernels) -> bool:
    """`kernels` against `eager` on a tiny input: the same codes, and the epilogues within fp32 rounding
    (a fused multiply-add rounds once where the eager passes round twice)."""
    rows = torch.linspace(-2.0, 3.0, 96).reshape(3, 32)
    got, want = kernels.quantize(rows), eager.quantize(rows)
    if not all(torch.equal(a, b) for a, b in zip(got, want, strict=True)):
        return False
    product, col_sums, bias = rows[:, :8] * 1e3, torch.linspace(-5.0, 5.0, 8)[None], torch.ones(8)
    scale, zero = want[1], want[2]
    return all(
        torch.allclose(fast(product, scale, zero, col_sums, bias, torch.float32),
                       slow(product, scale, zero, col_sums, bias, torch.float32), rtol=1e-5, atol=1e-5)
        for fast, slow in ((kernels.dequantize, eager.dequantize), (kernels.dequantize_gelu, eager.dequantize_gelu))
    )


class TokenInt8Linear(nn.Module):
    """y = x W^T + b (then GELU with `gelu`) with W as s8 codes per output channel and x quantised per row.

    Built from the codes (`from_linear` quantises an nn.Linear); `out_dtype` is what the layer after it
    reads (the residual stream's fp32, or the attention's compute dtype)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 kernels: Int8Kernels, out_dtype: torch.dtype = torch.float32, gelu: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.kernels = kernels
        self.out_dtype = out_dtype
        self.gelu = gelu
        # Plain attributes, not buffers: Module.to(dtype) must never cast the codes or oneDNN's packed copy.
        self.codes = codes.to(torch.int8)
        self.scales = scales.float()
        self.packed = torch.ops.onednn.qlinear_prepack(self.codes, None)
        self.col_sums = (self.codes.float().sum(1) * self.scales).unsqueeze(0)
        self.bias = (bias.detach().float() if bias is not None else torch.zeros(self.out_features)).clone()

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernels: Int8Kernels, out_dtype: torch.dtype = torch.float32,
                    gelu: bool = False) -> TokenInt8Linear:
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(1) / 127).clamp(min=1e-12)
        codes = torch.round(weight / scales[:, None]).clamp(-127, 127)
        return cls(codes, scales, linear.bias, kernels, out_dtype, gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        codes, scale, zero = self.kernels.quantize(rows)
        if self.kernels.reference:
            product = codes.float() @ (self.codes.float() * self.scales[:, None]).T
        else:
            product = onednn_int8_product(codes, self.packed, self.scales)
        finish = self.kernels.dequantize_gelu if self.gelu else self.kernels.dequantize
        y = finish(product, scale, zero, self.col_sums, self.bias, self.out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_encoder_token_int8(encoder: TransformerEncoder, kernels: Int8Kernels,
                                attention_dtype: torch.dtype, activation: str) -> None:
    """Swaps every projection of the encoder layers for a TokenInt8Linear, in place. The residual stream
    and LayerNorms stay fp32; Q, K and V come out in `attention_dtype` (bf16 where the CPU has native
    bf16: the fused attention kernel's fast path); an exact GELU runs in the first feed-forward product's
    epilogue."""
    fuse_gelu = activation == "gelu"
    for layer in cast(Iterable[EncoderLayer], encoder.layers):
        # ffn_in's output in fp32: MiniLM's min cosine 0.99569 against 0.99503 in bf16, at the same speed.
        inner = {"qkv": attention_dtype, "attn_out": torch.float32, "ffn_in": torch.float32, "ffn_out": torch.float32}
        for name in PROJECTIONS:
            linear = getattr(layer, name)
            gelu = fuse_gelu and name == "ffn_in"
            setattr(layer, name, TokenInt8Linear.from_linear(linear, kernels, inner[name], gelu))
        if fuse_gelu:
            layer.act = _identity
        layer.compute_dtype = torch.float32  # each product quantises its fp32 (or bf16) input itself


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
