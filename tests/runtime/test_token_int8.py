"""The per-token int8 recipe (oneDNN's u8 x s8 products on VNNI / AMX CPUs): its arithmetic, its kernels and
where the torch backend picks it. Its outputs' fidelity is checked in test_torch_precision on every CPU, with
the fp32 product of the same codes standing in for oneDNN's where this CPU's kernel would saturate."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import weakref
from functools import partial

import numpy as np
import pytest
import torch
from torch._inductor import config as inductor_config

from bgeserve.core import BackendOptions, OutputRequest
from bgeserve.models.checkpoint import load_checkpoint
from bgeserve.models.embedding_model import EmbeddingModel
from bgeserve.models.encoder import PROJECTIONS
from bgeserve.models.packed import PackedBatch, packed_attention
from bgeserve.runtime import cpu_features, torch_backend
from bgeserve.runtime.cpu_info import cpu_flags
from bgeserve.runtime.int8 import SmoothedInt8Linear
from bgeserve.runtime.int8_passes import Int8Kernels, LayerShape, quantize_rows
from bgeserve.runtime.token_int8 import (
    TokenInt8EncoderLayer,
    TokenInt8Linear,
    after_attention,
    onednn_int8_available,
    onednn_int8_product,
    quantize_encoder_token_int8,
)
from bgeserve.runtime.torch_backend import TorchBackend

pytestmark = pytest.mark.skipif(not onednn_int8_available(), reason="this torch has no oneDNN int8 ops")


def _rows(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    x[0] = x[0].abs() + 0.5  # a row without negatives: its range starts at 0
    x[1] *= 40  # an outlier row, as BERT's CLS row is
    return x


def test_rows_are_quantised_each_over_its_own_range_including_zero():
    x = _rows(0, (6, 64))
    codes, scale, zero = quantize_rows(x, torch.ones(64))
    assert codes.dtype == torch.uint8 and scale.shape == zero.shape == (6, 1)
    # Row 0 has no negatives: its range starts at 0 (zero point 0); the others reach both ends of the codes.
    assert zero[0].item() == 0 and codes[0].min() > 0 and (codes[1:].min(1).values == 0).all()
    assert (codes.max(1).values == 255).all()
    # Within half a level everywhere, whatever the row's magnitude, and exactly zero where x is.
    assert ((scale * (codes.float() - zero) - x).abs() <= scale / 2 + 1e-6).all()
    codes0, _, zero0 = quantize_rows(torch.tensor([[0.0, -1.0, 2.0]]), torch.ones(3))
    assert codes0[0, 0] == zero0[0, 0]


def test_rows_are_quantised_after_the_channel_factors():
    x, smooth = _rows(5, (4, 16)), torch.linspace(0.1, 2.0, 16)
    for got, want in zip(quantize_rows(x, smooth), quantize_rows(x * smooth, torch.ones(16)), strict=True):
        assert torch.equal(got, want)


def test_onednn_products_are_exact_where_nothing_saturates():
    """Weight codes within [-63, 63] keep every pair of u8 x s8 products under 16 bits, so even AVX2's
    saturating instruction is exact: oneDNN's product equals the integer one, on any CPU."""
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-63, 64, (48, 256), generator=gen, dtype=torch.int8)
    x = torch.randint(0, 256, (9, 256), generator=gen, dtype=torch.uint8)
    got = onednn_int8_product(x, torch.ops.onednn.qlinear_prepack(codes, None), torch.ones(48))
    want = x.long() @ codes.long().T  # |values| < 2^24: exact in fp32 too
    assert torch.equal(got, want.float())


@pytest.mark.parametrize("gelu", [False, True])
def test_the_layer_is_the_recipe_on_onednn_and_on_the_reference(gelu):
    """y = a (q - z) (w s)^T + b on the row-quantised input (then GELU), against float64 arithmetic."""
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(-63, 64, (48, 64), generator=gen).float()
    scales, bias = torch.rand(48, generator=gen) + 0.01, torch.randn(48, generator=gen)
    x = _rows(3, (7, 64)).reshape(1, 7, 64)
    q, a, z = (t.double() for t in quantize_rows(x[0], torch.ones(64)))
    weight = codes.double() * scales.double()[:, None]
    want = a * ((q - z) @ weight.T) + bias.double()
    want = torch.nn.functional.gelu(want) if gelu else want
    # fp32 keeps ~7 digits of the terms before they cancel: a (|q w| + |z w|), the largest of them.
    bound = 1e-6 * (a * (q.abs() @ weight.abs().T + z * weight.abs().sum(1))).max().item()
    for kernels in (Int8Kernels.eager(), Int8Kernels.reference_products()):
        got = TokenInt8Linear(codes, scales, bias, kernels, gelu=gelu)(x)
        assert got.shape == (1, 7, 48) and got.dtype == torch.float32
        assert (got[0].double() - want).abs().max().item() <= bound


def test_a_linear_layer_becomes_s8_codes_per_output_channel():
    linear = torch.nn.Linear(64, 32)
    layer = TokenInt8Linear.from_linear(linear, Int8Kernels.reference_products(), out_dtype=torch.bfloat16)
    assert layer.codes.dtype == torch.int8 and layer.codes.abs().amax(1).min() == 127
    weight = layer.codes.float() * layer.scales[:, None]
    assert (weight - linear.weight).abs().max() <= layer.scales.max() / 2 + 1e-7
    x = torch.randn(5, 64)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(y.float(), linear(x).detach(), dim=1).min() > 0.999


def test_smoothing_moves_outlier_channels_into_the_weights():
    """With each input channel's calibrated maximum, the layer quantises x / s and holds W * s: the same
    product, but an outlier channel no longer sets every row's range, so the other channels keep their
    levels (BERT-family activations have such channels)."""
    gen = torch.Generator().manual_seed(6)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(40, 64, generator=gen)
    x[:, 3] *= 60  # one outlier channel in every row
    kernels = Int8Kernels.reference_products()
    plain = TokenInt8Linear.from_linear(linear, kernels)
    smoothed = TokenInt8Linear.from_linear(linear, kernels, input_max=x.abs().amax(0))
    assert torch.allclose(smoothed.codes.float() * smoothed.scales[:, None] * smoothed.smooth,
                          linear.weight.detach(), atol=smoothed.scales.max().item())
    with torch.no_grad():
        want = linear(x)
        errors = [(layer(x) - want).norm().item() for layer in (plain, smoothed)]
    assert errors[1] < errors[0] / 2


def test_the_probe_finds_a_saturating_product():
    """oneDNN held to AVX2 saturates u8 x s8 on every CPU; the probe must see it (the torch backend then
    keeps the SmoothQuant recipe)."""
    code = "from bgeserve.runtime.cpu_features import onednn_int8_exact; print(onednn_int8_exact())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(not {"avx512_vnni", "amx_int8"} & cpu_flags(), reason="needs AVX512-VNNI or AMX: the exact kernel")
def test_the_probe_finds_this_cpus_exact_product():
    assert cpu_features.onednn_int8_exact()


def _require_compiled(compiled: bool) -> None:
    """Skips where Inductor has no C++ compiler (the load then runs the eager kernels, as it should);
    with one, a load that fell back to eager (its compiled results differed, or the compile failed) fails."""
    if not compiled:
        if not any(cxx and shutil.which(cxx) for cxx in inductor_config.cpp.cxx):
            pytest.skip("no C++ compiler for torch.compile here: the eager kernels run")
        pytest.fail("a C++ compiler is here, yet the load fell back to the eager kernels (see its log)")


@pytest.mark.parametrize("attention", [torch.float32, torch.bfloat16])
def test_compiled_kernels_equal_the_eager_ones(attention):
    """The graphs built for a layer's shape, on fresh inputs of every variant that layer runs (one row and
    several): the eager functions' results, and no graph compiled anew."""
    shape = LayerShape(hidden=40, intermediate=96, attention_dtype=attention, gelu=True)
    kernels = Int8Kernels.build(shape)
    _require_compiled(kernels.compiled)
    eager, gen = Int8Kernels.eager(), torch.Generator().manual_seed(4)
    h, f = shape.hidden, shape.intermediate
    # A layer's constants are plain tensors made at load; what runs through it, inference tensors.
    smooth = {width: torch.rand(width, generator=gen) + 0.5 for width in (h, f)}
    col_sums = {width: torch.randn(1, width, generator=gen) * 100 for width in (h, 3 * h, f)}
    bias = {width: torch.randn(width, generator=gen) for width in (h, 3 * h, f)}
    norm = (torch.rand(h, generator=gen) + 0.5, torch.randn(h, generator=gen), shape.norm_eps)
    with torch.compiler.set_stance("fail_on_recompile"), torch.inference_mode():
        for rows in (1, 37, 5):
            for width, in_dtype in ((h, torch.float32), (h, attention), (f, torch.float32)):
                x = _rows(rows, (max(rows, 2), width))[:rows].to(in_dtype)
                got, want = kernels.quantize(x, smooth[width]), eager.quantize(x, smooth[width])
                for a, b in zip(got, want, strict=True):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
            _, scale, zero = want
            for fast, slow, width, out_dtype in ((kernels.dequantize, eager.dequantize, 3 * h, attention),
                                                 (kernels.dequantize_gelu, eager.dequantize_gelu, f, torch.float32)):
                terms = (torch.randn(rows, width, generator=gen) * 1e4, scale, zero, col_sums[width], bias[width],
                         out_dtype)
                y = fast(*terms)
                assert y.dtype == out_dtype
                torch.testing.assert_close(y, slow(*terms))
            # The epilogues that carry on through the residual add and LayerNorm (and the next quantisation).
            terms = (torch.randn(rows, h, generator=gen) * 1e4, scale, zero, col_sums[h], bias[h],
                     torch.randn(rows, h, generator=gen), *norm)
            torch.testing.assert_close(kernels.dequantize_norm(*terms), eager.dequantize_norm(*terms),
                                       rtol=1e-4, atol=1e-4)
            fast_out = kernels.dequantize_norm_quantize(*terms, smooth[h])
            slow_out = eager.dequantize_norm_quantize(*terms, smooth[h])
            torch.testing.assert_close(fast_out[0], slow_out[0], rtol=1e-4, atol=1e-4)
            # Codes of values a last bit apart may sit one level apart; the rest is the same quantisation.
            assert fast_out[1].dtype == torch.uint8
            assert (fast_out[1].int() - slow_out[1].int()).abs().max() <= 1
            assert (fast_out[3] - slow_out[3]).abs().max() <= 1
            torch.testing.assert_close(fast_out[2], slow_out[2], rtol=1e-4, atol=0)


# Run in a child process: it pins Inductor's thread count, which a later compile in this process must not
# inherit, and dropping the compiled graphs afterwards (`torch._dynamo.reset`) while other tests' compiled
# functions are alive is not something the suite's own process should do. The child's exit status counts.
_THREADED_BUILD = """
import json, sys
from torch._inductor import config
from torch._inductor.utils import run_and_get_code
from bgeserve.runtime.int8_passes import Int8Kernels
settings = {"fx_graph_cache": False, "cpp.threads": int(sys.argv[1]), "cpp.dynamic_threads": False}
with config.patch(settings):
    kernels, sources = run_and_get_code(Int8Kernels.build)
parallel = sum("#pragma omp parallel" in source for source in sources)
print(json.dumps({"compiled": kernels.compiled, "parallel": parallel, "graphs": len(sources)}))
"""


@pytest.mark.parametrize("threads", [2, 48])
def test_the_kernels_compiled_at_load_split_many_rows_among_threads(threads: int) -> None:
    """Inductor sizes a dynamic graph's loops by the inputs it is first compiled on: on a few rows it
    writes single-threaded kernels, and those then serve every batch, on a laptop or a 48-thread server."""
    # Compiled in the child, not read from the disk cache; at `threads`, whatever this machine or the
    # environment (TORCHINDUCTOR_CPP_*) says.
    child = subprocess.run([sys.executable, "-c", _THREADED_BUILD, str(threads)],
                           capture_output=True, text=True, timeout=600, check=False)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    result = json.loads(child.stdout.strip().splitlines()[-1])
    _require_compiled(result["compiled"])
    # Those on several rows: the three quantisations in (the residual stream, attention's context, the
    # feed-forward's middle), the two epilogues out (Q, K and V; GELU), the two through a LayerNorm.
    parallel, graphs = result["parallel"], result["graphs"]
    assert parallel >= 7, f"{parallel} of {graphs} compiled graphs use more than one thread"


def _int8_layer(checkpoint, kernels: Int8Kernels, attention: torch.dtype, activation: str = "gelu",
                smoothed: bool = True):
    """The first encoder layer of `checkpoint` as a TokenInt8EncoderLayer (`smoothed`: each projection by
    channel maxima of its own, made up), and the fp32 layer it was made from."""
    model = EmbeddingModel(load_checkpoint(str(checkpoint)))
    fp32 = copy.deepcopy(model.encoder.layers[0])
    gen = torch.Generator().manual_seed(10)
    maxima = {f"{i}.{name}": torch.rand(getattr(layer, name).in_features, generator=gen) * 4 + 0.1
              for i, layer in enumerate(model.encoder.layers) for name in PROJECTIONS}
    quantize_encoder_token_int8(model.encoder, kernels, attention, activation, maxima if smoothed else None)
    return model.encoder.layers[0], fp32


def _packed_input(rows_per_text: list[int], width: int, seed: int):
    """Hidden states of texts of these lengths, packed, and the attention over them."""
    gen = torch.Generator().manual_seed(seed)
    batch = PackedBatch.from_sequences([[5] * n for n in rows_per_text])
    return torch.randn(sum(rows_per_text), width, generator=gen), partial(packed_attention, batch=batch), batch


@pytest.mark.parametrize("activation", ["gelu", "gelu_new"])
def test_the_fused_layer_computes_its_projections_and_norms_one_after_another(m3_checkpoint, activation):
    """Eagerly, the fused passes are the same arithmetic in the same order as the block's own steps (each
    projection's quantisation, product and epilogue, the residual adds and LayerNorms): the same bits."""
    layer, _ = _int8_layer(m3_checkpoint, Int8Kernels.reference_products(), torch.float32, activation)
    hidden, attend, batch = _packed_input([7, 3, 12], layer.qkv.in_features, seed=8)

    def step_by_step(rows: torch.Tensor | None) -> torch.Tensor:
        ctx, h = attend(layer.qkv(hidden).view(-1, 3, layer.num_heads, layer.head_dim)), hidden
        if rows is not None:
            ctx, h = ctx[rows], h[rows]
        h = layer.attn_norm(layer.attn_out(ctx) + h)
        inner = layer.ffn_in(h) if layer.ffn_in.gelu else layer.act(layer.ffn_in(h))
        return layer.ffn_norm(layer.ffn_out(inner) + h)

    with torch.inference_mode():
        for rows in (None, batch.starts):
            assert torch.equal(layer.forward_packed(hidden, attend, rows), step_by_step(rows))


def test_the_fused_layer_stays_close_to_the_fp32_layer(m3_checkpoint):
    """The int8 layer against the fp32 block it replaced, packed and padded: a misplaced residual, norm or
    activation would be far off; int8's own error is not."""
    layer, fp32 = _int8_layer(m3_checkpoint, Int8Kernels.reference_products(), torch.float32, smoothed=False)
    hidden, attend, batch = _packed_input([9, 4, 16], layer.qkv.in_features, seed=9)
    with torch.inference_mode():
        got, want = layer.forward_packed(hidden, attend), fp32.forward_packed(hidden, attend)
        assert torch.nn.functional.cosine_similarity(got, want, dim=1).min() > 0.995
        padded, mask = batch.pad(hidden, 0.0), batch.mask().to(torch.bool)[:, None, None, :]
        got_padded = layer(padded, mask)[batch.segment, batch.offset]
        assert torch.nn.functional.cosine_similarity(got_padded, want, dim=1).min() > 0.995


@pytest.mark.parametrize("attention", [torch.float32, torch.bfloat16])
def test_requests_through_a_layer_run_the_graphs_compiled_at_load(m3_checkpoint, attention):
    """A whole int8 layer, as a request runs it (one text of one row, several texts, the last layer's CLS
    rows; the padded layout), with the kernels built for the checkpoint's shape as the backend builds
    them: no pass compiles anew."""
    ckpt = load_checkpoint(str(m3_checkpoint))
    kernels = Int8Kernels.build(LayerShape.of(ckpt.config, attention))
    _require_compiled(kernels.compiled)
    layer, _ = _int8_layer(m3_checkpoint, kernels, attention)
    with torch.compiler.set_stance("fail_on_recompile"), torch.inference_mode():
        for seed, lengths in enumerate(([1], [6], [5, 9, 2])):
            hidden, attend, batch = _packed_input(lengths, layer.qkv.in_features, seed)
            assert layer.forward_packed(hidden, attend).shape == hidden.shape
            assert layer.forward_packed(hidden, attend, batch.starts).shape == (len(lengths), hidden.shape[1])
            mask = batch.mask().to(torch.bool)[:, None, None, :]
            assert layer(batch.pad(hidden, 0.0), mask).shape == (len(lengths), batch.max_len, hidden.shape[1])


@pytest.mark.parametrize("attention", [torch.float32, torch.bfloat16])
def test_the_steps_after_attention_run_as_one_graph_every_layer_shares(m3_checkpoint, attention):
    """Compiled, a layer's three products after attention and the passes between them are one graph, made
    at load and shared by every layer: the results of the passes one call each, on one row or many, and no
    graph compiled anew."""
    ckpt = load_checkpoint(str(m3_checkpoint))
    kernels = Int8Kernels.build(LayerShape.of(ckpt.config, attention))
    _require_compiled(kernels.compiled)
    model = EmbeddingModel(ckpt)
    assert quantize_encoder_token_int8(model.encoder, kernels, attention, "gelu")
    layers = [layer for layer in model.encoder.layers if isinstance(layer, TokenInt8EncoderLayer)]
    step = layers[0].after_attention
    assert len(layers) > 1 and not isinstance(step, partial) and all(lay.after_attention is step for lay in layers)
    passes = partial(after_attention, passes=Int8Kernels.eager())
    with torch.compiler.set_stance("fail_on_recompile"), torch.inference_mode():
        for seed, lengths in enumerate(([1], [6], [5, 9, 2])):
            hidden, attend, batch = _packed_input(lengths, layers[0].qkv.in_features, seed)
            for layer, rows in ((layers[0], None), (layers[-1], batch.starts)):
                got = layer.forward_packed(hidden, attend, rows)
                layer.after_attention = passes
                want = layer.forward_packed(hidden, attend, rows)
                layer.after_attention = step
                assert torch.nn.functional.cosine_similarity(got, want, dim=1).min() >= 0.9999
                torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("compiler", ["fails", "miscompiles"])
def test_a_layer_that_will_not_compile_into_one_graph_runs_its_passes(m3_checkpoint, monkeypatch, caplog, compiler):
    """Where the graph does not compile, or gives other results than the passes, the load says so and the
    layers run the passes one call each (here the eager ones, standing in for compiled ones on any machine)."""
    kernels = dataclasses.replace(Int8Kernels.eager(), compiled=True)

    def fake_compile(fn, **_options):
        def run(layer, ctx, hidden):
            if compiler == "fails":
                raise RuntimeError("InductorError: no working C++ compiler")
            return torch.zeros_like(fn(layer, ctx, hidden))
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = EmbeddingModel(load_checkpoint(str(m3_checkpoint)))
    with caplog.at_level("INFO", logger="bgeserve.runtime.token_int8"):
        assert quantize_encoder_token_int8(model.encoder, kernels, torch.float32, "gelu") is False
    assert "running its passes" in caplog.text or "running the passes" in caplog.text
    layer = model.encoder.layers[0]
    assert isinstance(layer.after_attention, partial) and layer.after_attention.keywords["passes"] is kernels
    hidden, attend, _ = _packed_input([4, 2], layer.qkv.in_features, seed=3)
    with torch.inference_mode():
        assert torch.isfinite(layer.forward_packed(hidden, attend)).all()


def test_each_fp32_layer_is_released_as_its_int8_layer_replaces_it(m3_checkpoint, monkeypatch):
    """Swapping the layers one by one keeps a single fp32 layer alive at a time, not all of them until the
    end (for bge-m3 that is 1.2 GB more at the load's peak)."""
    model = EmbeddingModel(load_checkpoint(str(m3_checkpoint)))
    originals = [weakref.ref(layer) for layer in model.encoder.layers]
    alive_while_building: list[int] = []
    build = TokenInt8EncoderLayer.__init__

    def counting(self, layer, projections, kernels):  # noqa: ANN001 - TokenInt8EncoderLayer's own signature
        gc.collect()
        alive_while_building.append(sum(ref() is not None for ref in originals))
        build(self, layer, projections, kernels)

    monkeypatch.setattr(TokenInt8EncoderLayer, "__init__", counting)
    quantize_encoder_token_int8(model.encoder, Int8Kernels.reference_products(), torch.float32, "gelu")
    # The layer being replaced, and the ones not reached yet.
    assert alive_while_building == [len(originals) - i for i in range(len(originals))]


def test_an_activation_other_than_gelu_runs_after_the_product(m3_checkpoint):
    model = EmbeddingModel(load_checkpoint(str(m3_checkpoint)))
    act = model.encoder.layers[0].act
    quantize_encoder_token_int8(model.encoder, Int8Kernels.reference_products(), torch.float32, "gelu_new")
    layer = model.encoder.layers[0]
    assert layer.act is act and not layer.ffn_in.gelu


@pytest.fixture()
def eager_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compile at load: these tests look at the recipe chosen, not its speed."""
    monkeypatch.setattr(torch_backend.Int8Kernels, "build", classmethod(lambda cls, *_: cls.eager()))


def test_the_recipe_follows_the_cpu_class(m3_checkpoint, cpu_class, eager_kernels):
    backend = TorchBackend(load_checkpoint(str(m3_checkpoint)), options=BackendOptions(dtype="int8"))
    recipe, layer = backend.int8_recipe or "", backend.model.encoder.layers[0]
    if cpu_class.int8_weights == "s8":  # VNNI or AMX
        attention = "bf16" if cpu_class.auto_dtype == "bf16" else "fp32"
        assert recipe.startswith("per-token u8 x s8 on oneDNN") and f"{attention} attention" in recipe
        assert isinstance(layer, TokenInt8EncoderLayer)
        assert all(isinstance(getattr(layer, name), TokenInt8Linear) for name in ("qkv", "attn_out", "ffn_in"))
        assert layer.qkv.out_dtype == (torch.bfloat16 if attention == "bf16" else torch.float32)
        assert layer.ffn_in.gelu and layer.ffn_in.out_dtype == torch.float32
        assert not torch.equal(layer.qkv.smooth, torch.ones(layer.qkv.in_features))  # calibrated at load
    else:
        assert recipe.startswith("SmoothQuant") and isinstance(layer.qkv, SmoothedInt8Linear)


def test_a_vnni_cpu_whose_onednn_saturates_keeps_smoothquant(m3_checkpoint, simulate_cpu, monkeypatch, eager_kernels):
    simulate_cpu("xeon-amx")
    monkeypatch.setattr(cpu_features, "onednn_int8_exact", lambda: False)
    backend = TorchBackend(load_checkpoint(str(m3_checkpoint)), options=BackendOptions(dtype="int8"))
    assert (backend.int8_recipe or "").startswith("SmoothQuant")


def test_cls_rows_of_the_last_layer_give_the_full_pass_vectors(m3_checkpoint, monkeypatch):
    """A dense-only request runs the last layer on each text's CLS row; each row is quantised on its own,
    so its vector is the one of the pass over every row (here with the reference products, on any CPU)."""
    monkeypatch.setattr(torch_backend, "exact_int8_products", lambda: True)
    monkeypatch.setattr(torch_backend, "cpu_has_native_bf16", lambda: False)  # fp32 attention on any CPU
    monkeypatch.setattr(torch_backend.Int8Kernels, "build", classmethod(lambda cls, *_: cls.reference_products()))
    ckpt = load_checkpoint(str(m3_checkpoint))
    backend = TorchBackend(ckpt, options=BackendOptions(dtype="int8"))
    ids = ckpt.tokenizer.encode(["a short one", "a somewhat longer text about int8 products", "x"], max_length=64).ids
    dense_only = backend.run(ids, OutputRequest())
    full = backend.run(ids, OutputRequest(sparse=True))
    for a, b in zip(dense_only, full, strict=True):
        assert np.abs(a.dense - b.dense).max() <= 1e-5
