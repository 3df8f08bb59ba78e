"""oneDNN packed-weight linears: the same numbers as torch's F.linear, GELU fused or not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bgeserve.models.checkpoint import load_checkpoint
from bgeserve.models.embedding_model import EmbeddingModel
from bgeserve.runtime.cpu_linear import PackedWeightLinear, onednn_linear_available, pack_encoder_linears

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("gelu", [None, "none", "tanh"])
@pytest.mark.parametrize("rows", [1, 37, 300])
def test_packed_linear_equals_f_linear(gelu, rows):
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 160)
    x = torch.randn(rows, 96, generator=gen)
    want = F.linear(x, linear.weight, linear.bias)
    if gelu:
        want = F.gelu(want, approximate=gelu)
    got = PackedWeightLinear(linear, gelu)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Batched [B, n, K] input, as the padded (compile) layout passes it.
    torch.testing.assert_close(PackedWeightLinear(linear, gelu)(x.view(1, rows, 96)), want.view(1, rows, -1))


@torch.inference_mode()
def test_packing_the_encoder_keeps_its_output(m3_checkpoint):
    ckpt = load_checkpoint(str(m3_checkpoint))
    model = EmbeddingModel(ckpt)
    ids = torch.tensor([[0, 5, 6, 7, 8, 2]])
    mask = torch.ones_like(ids)
    before = model(ids, mask)
    assert pack_encoder_linears(model.encoder, ckpt.config.hidden_act)
    assert all(isinstance(layer.ffn_in, PackedWeightLinear) for layer in model.encoder.layers)
    torch.testing.assert_close(model(ids, mask), before, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_bf16_packs_or_leaves_the_encoder_alone(m3_checkpoint):
    """bf16 needs AVX512-BF16/AMX (or AVX-NE-CONVERT): packed where there, untouched and still usable where not."""
    ckpt = load_checkpoint(str(m3_checkpoint))
    model = EmbeddingModel(ckpt)
    model.encoder.set_compute_dtype(torch.bfloat16)
    ids = torch.tensor([[0, 5, 6, 7, 8, 2]])
    mask = torch.ones_like(ids)
    before = model(ids, mask)
    packed = pack_encoder_linears(model.encoder, ckpt.config.hidden_act)
    kinds = {type(layer.qkv) for layer in model.encoder.layers}
    assert kinds == ({PackedWeightLinear} if packed else {nn.Linear})
    torch.testing.assert_close(model(ids, mask), before, atol=2e-2, rtol=2e-2)


@torch.inference_mode()
def test_bf16_on_a_cpu_without_onednn_bf16_keeps_torchs_gemm(m3_checkpoint, simulate_cpu):
    """The AVX2 branch on any CPU: oneDNN refuses the bf16 weights, so nothing is swapped and the encoder runs."""
    simulate_cpu("epyc-avx2")
    ckpt = load_checkpoint(str(m3_checkpoint))
    model = EmbeddingModel(ckpt)
    model.encoder.set_compute_dtype(torch.bfloat16)
    ids = torch.tensor([[0, 5, 6, 7, 8, 2]])
    mask = torch.ones_like(ids)
    before = model(ids, mask)
    assert pack_encoder_linears(model.encoder, ckpt.config.hidden_act) is False
    kinds = {type(getattr(layer, name)) for layer in model.encoder.layers for name in ("qkv", "ffn_in", "ffn_out")}
    assert kinds == {nn.Linear}
    torch.testing.assert_close(model(ids, mask), before)
    # fp32 still packs there: only bf16 lacks oneDNN kernels on AVX2.
    fp32 = EmbeddingModel(ckpt)
    assert pack_encoder_linears(fp32.encoder, ckpt.config.hidden_act)
