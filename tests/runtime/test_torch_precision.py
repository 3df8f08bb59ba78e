"""Every fast torch path against the exact fp32 path, with a tolerance per precision."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from bgeserve.core import BackendOptions, OutputRequest
from bgeserve.data import sample_texts
from bgeserve.models.checkpoint import load_checkpoint
from bgeserve.models.embedding_model import EmbeddingModel
from bgeserve.models.encoder import PROJECTIONS
from bgeserve.runtime import cpu_features, torch_backend
from bgeserve.runtime.cpu_features import cpu_has_native_bf16, int8_product_rate, matmul_rate
from bgeserve.runtime.devices import (
    INT8_NOTE_MIN_SPEEDUP,
    INT8_NOTE_MIN_SPEEDUP_OVER_AMX_BF16,
    auto_dtype,
    choose_cpu_dtype,
    int8_note,
    resolve_dtype,
)
from bgeserve.runtime.int8 import input_maxima
from bgeserve.runtime.int8_passes import Int8Kernels
from bgeserve.runtime.token_int8 import TokenInt8Linear
from bgeserve.runtime.torch_backend import TorchBackend

CORPUS = sample_texts()


def _dense(backend: TorchBackend, ids: list[list[int]], want: OutputRequest | None = None):
    items = backend.run(ids, want or OutputRequest())
    return np.stack([it.dense for it in items]), items


def _knn_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    def top(e):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :k]

    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top(a), top(b), strict=True)]))


@pytest.fixture(scope="module")
def minilm_corpus(minilm_path):
    ckpt = load_checkpoint(str(minilm_path))
    ids = ckpt.tokenizer.encode(CORPUS, max_length=ckpt.max_length).ids
    return ckpt, ids, _dense(TorchBackend(ckpt), ids)[0]


@pytest.fixture(params=["smoothquant", "per-token, fp32 attention", "per-token, bf16 attention",
                        "per-token, this CPU's kernels"])
def int8_recipe(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each recipe of the torch int8 path, whatever this CPU would pick: SmoothQuant over torch's dynamic
    kernel (CPUs without VNNI), or per-token u8 x s8 (VNNI / AMX), its products here as the fp32 product of
    the same codes, which is what oneDNN computes there (test_int8_products_are_the_reference_arithmetic_here);
    and, where this CPU makes them exact, oneDNN's own products with the kernels a server would build."""
    if request.param.endswith("this CPU's kernels"):
        if not cpu_features.exact_int8_products():
            pytest.skip("oneDNN's u8 x s8 saturates on this CPU (no VNNI): the per-token recipe does not run here")
        return request.param
    per_token = request.param.startswith("per-token")
    monkeypatch.setattr(torch_backend, "exact_int8_products", lambda: per_token)
    monkeypatch.setattr(torch_backend, "cpu_has_native_bf16", lambda: "bf16" in request.param)
    monkeypatch.setattr(torch_backend.Int8Kernels, "build", classmethod(lambda cls, *_: cls.reference_products()))
    return request.param


def test_int8_keeps_neighbours_on_real_minilm(minilm_corpus, int8_recipe):
    ckpt, ids, exact = minilm_corpus
    backend = TorchBackend(ckpt, options=BackendOptions(dtype="int8"))
    assert (backend.int8_recipe or "").startswith("per-token" if "per-token" in int8_recipe else "SmoothQuant")
    quantized, _ = _dense(backend, ids)
    # The min over the lines int8 did not calibrate on. Per-token u8 x s8 measured 0.9978-0.9980 / 0.969-0.972
    # (0.9939-0.9959 / 0.952-0.957 unsmoothed, where a last-bit change in any product moved it by as much);
    # SmoothQuant 0.9947 / 0.946 (naive per-tensor dynamic int8: 0.76 / 0.69).
    calibration = set(torch_backend.calibration_texts())
    held_out = [i for i, text in enumerate(CORPUS) if text not in calibration]
    cosine = (quantized * exact).sum(1)[held_out]
    assert cosine.min() >= (0.996 if "per-token" in int8_recipe else 0.99)
    assert _knn_overlap(exact, quantized) >= (0.96 if "per-token" in int8_recipe else 0.9)


@pytest.mark.skipif(not cpu_features.exact_int8_products(), reason="oneDNN's u8 x s8 saturates on this CPU (no VNNI)")
def test_int8_products_are_the_reference_arithmetic_here(minilm_corpus, monkeypatch):
    """Where the per-token recipe runs for real, every product of a pass over real text gives, on oneDNN's
    kernels, the float64 arithmetic of its codes. (Whole outputs are no check: quantisation turns a
    last-bit difference in one product into a different code downstream, so two exact kernels that round
    differently give vectors ~0.997 apart; cos to fp32 is the test above.) The passes around the products
    are checked in test_token_int8: eager against float64, compiled against eager."""
    monkeypatch.setattr(torch_backend.Int8Kernels, "build", classmethod(lambda cls, *_: cls.eager()))
    ckpt, ids, _ = minilm_corpus
    backend = TorchBackend(ckpt, options=BackendOptions(dtype="int8"))
    assert (backend.int8_recipe or "").startswith("per-token")
    # The codes again, from the checkpoint's weights and the same calibration (oneDNN keeps only its packing).
    fp32 = EmbeddingModel(ckpt)
    maxima = input_maxima(fp32, backend._calibration_batches())
    codes_of: dict[int, torch.Tensor] = {}
    for i, (layer, source) in enumerate(zip(backend.model.encoder.layers, fp32.encoder.layers, strict=True)):
        for name in PROJECTIONS:
            twin = TokenInt8Linear.from_linear(getattr(source, name), Int8Kernels.reference_products(),
                                               input_max=maxima[f"{i}.{name}"])
            real = getattr(layer, name)
            assert torch.equal(twin.scales, real.scales) and torch.equal(twin.smooth, real.smooth)
            codes_of[id(real)] = twin.codes.double() * twin.scales.double()[:, None]
    seen: list[tuple[TokenInt8Linear, torch.Tensor, torch.Tensor]] = []
    product = TokenInt8Linear.product

    def recorded(module: TokenInt8Linear, codes: torch.Tensor) -> torch.Tensor:
        out = product(module, codes)
        seen.append((module, codes, out))
        return out

    monkeypatch.setattr(TokenInt8Linear, "product", recorded)
    _dense(backend, ids[:24])
    layers = [m for m in backend.model.modules() if isinstance(m, TokenInt8Linear)]
    assert {id(m) for m, _, _ in seen} == {id(m) for m in layers} == set(codes_of)
    for layer, codes, out in seen:
        assert codes.dtype == torch.uint8
        weight = codes_of[id(layer)]
        want = codes.double() @ weight.T
        # fp32 keeps ~7 digits of the sum of |terms|, the most that rounding can move.
        bound = 1e-6 * (codes.double() @ weight.abs().T).max().item()
        assert (out.double() - want).abs().max().item() <= bound


def test_int8_keeps_top_sparse_tokens(m3_checkpoint, int8_recipe):
    ckpt = load_checkpoint(str(m3_checkpoint))
    ids = ckpt.tokenizer.encode(CORPUS[:64], max_length=128).ids
    want = OutputRequest(sparse=True)
    _, exact = _dense(TorchBackend(ckpt), ids, want)
    _, quantized = _dense(TorchBackend(ckpt, options=BackendOptions(dtype="int8")), ids, want)

    def top(d):
        return set(sorted(d, key=d.get, reverse=True)[:10])

    overlap = [len(top(a.lexical_weights) & top(b.lexical_weights)) / max(1, len(top(a.lexical_weights)))
               for a, b in zip(exact, quantized, strict=True)]
    assert np.mean(overlap) >= 0.9


@pytest.mark.parametrize("onednn", ["this CPU's", "none (AVX2)"])
def test_bf16_is_close_and_finite(minilm_corpus, simulate_cpu, onednn):
    """The issue's bf16 class (min cosine >= 0.9999 vs fp32) on real weights; measured 0.99995 over this corpus
    (bf16 is emulated on CPUs without it: the same rounding, only slower), on oneDNN's packed bf16 kernels
    where this CPU has them and on torch's default GEMM, which is what runs where oneDNN has none."""
    if onednn != "this CPU's":
        simulate_cpu("epyc-avx2")
    ckpt, ids, exact = minilm_corpus
    half, _ = _dense(TorchBackend(ckpt, options=BackendOptions(dtype="bf16")), ids)
    assert np.isfinite(half).all()
    assert (half * exact).sum(1).min() >= 0.9999


def test_compiled_equals_eager(m3_checkpoint):
    ckpt = load_checkpoint(str(m3_checkpoint))
    ids = ckpt.tokenizer.encode(CORPUS[:12], max_length=64).ids
    want = OutputRequest(sparse=True, colbert=True)
    eager = TorchBackend(ckpt).run(ids, want)
    compiled = TorchBackend(ckpt, options=BackendOptions(dtype="fp32", compile=True)).run(ids, want)
    for a, b in zip(eager, compiled, strict=True):
        assert np.abs(a.dense - b.dense).max() <= 1e-5
        assert np.abs(a.colbert - b.colbert).max() <= 1e-5
        assert a.lexical_weights.keys() == b.lexical_weights.keys()


def test_dtype_rules():
    assert resolve_dtype("bfloat16", "cpu") == "bf16"
    assert resolve_dtype("float32", "cpu") == "fp32" and resolve_dtype("qint8", "cpu") == "int8"
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="int8 runs on CPU"):
        resolve_dtype("int8", "cuda:0")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8", "cpu")


@pytest.mark.parametrize(
    ("capabilities", "native"),
    [
        ({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, False),  # AMD EPYC Zen 2/3, Intel clients
        ({"avx2": True, "avx_vnni": True, "avx_ne_convert": True}, False),  # bf16 conversions only, no products
        ({"avx512_f": True, "avx512_bw": True, "avx512_bf16": False}, False),  # Skylake-X: emulated bf16
        ({"avx512_f": True, "avx512_bf16": True, "amx_bf16": False}, True),  # AMD Zen 4/5, Intel Cooper Lake
        ({"avx512_bf16": True, "amx_tile": True, "amx_bf16": True}, True),  # Intel Sapphire Rapids and later
        ({"amx_bf16": True}, True),
        ({}, False),  # a torch that reports nothing
    ],
)
def test_native_bf16_comes_from_the_cpu_features(capabilities, native):
    assert cpu_has_native_bf16(capabilities) is native


def test_auto_dtype_on_each_cpu_class(cpu_class):
    """What `dtype=auto` picks on CPU follows the features and rates the code is given, not this machine."""
    choice, why = auto_dtype("cpu")
    assert choice == cpu_class.auto_dtype and resolve_dtype("auto", "cpu") == choice
    speedup = cpu_class.bf16_rate / cpu_class.fp32_rate
    assert ("no native bf16" in why) if choice == "fp32" else (f"measured {speedup:.1f}x fp32" in why)
    chosen_rate = cpu_class.bf16_rate if choice == "bf16" else cpu_class.fp32_rate
    int8_speedup = cpu_class.int8_rate / chosen_rate
    # With VNNI the torch int8 path runs oneDNN's exact u8 x s8 products; without, the onnx graph is the faster.
    hint = "--dtype int8 (without --compile" if cpu_class.int8_weights == "s8" else "--backend onnx --dtype int8 is"
    amx_bf16 = choice == "bf16" and "amx_bf16" in cpu_class.flags
    if int8_speedup >= (INT8_NOTE_MIN_SPEEDUP_OVER_AMX_BF16 if amx_bf16 else INT8_NOTE_MIN_SPEEDUP):
        assert f"int8 products measured {int8_speedup:.1f}x {choice} here: {hint}" in why
    else:
        assert "int8" not in why


def test_int8_is_named_only_when_its_products_outrun_the_choice_and_never_chosen():
    rates = {torch.float32: 100e9, torch.bfloat16: 400e9}
    note = int8_note("bf16", rates.__getitem__, lambda: 1000e9)
    assert note is not None and note.startswith("int8 products measured 2.5x bf16 here")
    assert int8_note("bf16", rates.__getitem__, lambda: 500e9) is None  # 1.25x: within the start-up probe's noise
    assert int8_note("fp32", rates.__getitem__, lambda: None) is None  # no onnxruntime: nothing measured


@pytest.mark.parametrize(("int8_over_bf16", "noted"), [(1.6, False), (2.4, False), (2.6, True)])
def test_over_amx_bf16_the_int8_note_needs_the_margin_its_passes_leave(monkeypatch, simulate_cpu, int8_over_bf16,
                                                                      noted):
    """On AMX, int8 products probed 1.6x bf16's came with whole passes at 0.65x: the note waits for 2.5x
    there, while an AVX512-BF16 CPU without AMX gets it from 1.3x."""
    amx = simulate_cpu("xeon-amx")
    monkeypatch.setattr(cpu_features, "int8_product_rate", lambda: int8_over_bf16 * amx.bf16_rate)
    choice, why = auto_dtype("cpu")
    assert choice == "bf16" and ("int8 products measured" in why) is noted
    zen5 = simulate_cpu("zen5-avx512-bf16")
    monkeypatch.setattr(cpu_features, "int8_product_rate", lambda: int8_over_bf16 * zen5.bf16_rate)
    choice, why = auto_dtype("cpu")
    assert choice == "bf16" and f"int8 products measured {int8_over_bf16:.1f}x bf16 here" in why


def test_int8_product_rate_is_the_products_ops_over_its_best_timing(monkeypatch):
    """The graph runs on this onnxruntime (untimed warm-up, then each repeat timed): 2 x 8 x 64 x 256 ops
    over the best of the scripted 0.5, 0.25 and 0.4 s."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    clock = _ScriptedClock([0.5, 0.25, 0.4])
    monkeypatch.setattr(cpu_features, "time", clock)
    assert int8_product_rate(rows=8, size=64, repeats=3) == 2 * 8 * 64 * 256 / 0.25
    assert clock.reads == 6


def test_an_int8_kernel_that_cannot_run_costs_the_note_not_the_start(monkeypatch, simulate_cpu):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    def refuse(*_args, **_kwargs):
        raise RuntimeError("Unsupported model IR version: 99, max supported IR version: 8")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    assert int8_product_rate(rows=8, size=64) is None
    simulate_cpu("zen5-avx512-bf16")
    monkeypatch.setattr(cpu_features, "int8_product_rate", int8_product_rate)  # the real one, refused
    choice, why = auto_dtype("cpu")
    assert choice == "bf16" and "int8" not in why


def test_auto_picks_bf16_on_cpu_only_when_native_and_measured_faster():
    def never(_dtype: torch.dtype) -> float:
        raise AssertionError("no measurement without native bf16")

    assert choose_cpu_dtype(False, never)[0] == "fp32"
    rates = {torch.float32: 100e9, torch.bfloat16: 400e9}
    dtype, why = choose_cpu_dtype(True, rates.__getitem__)
    assert dtype == "bf16" and "4.0x" in why
    rates[torch.bfloat16] = 110e9
    assert choose_cpu_dtype(True, rates.__getitem__)[0] == "fp32"


class _ScriptedClock:
    """cpu_features' perf_counter: timed product i takes durations[i] seconds; reading it more often fails."""

    def __init__(self, durations: list[float]) -> None:
        self._readings = [value for i, d in enumerate(durations) for value in (10.0 * (i + 1), 10.0 * (i + 1) + d)]
        self.reads = 0

    def perf_counter(self) -> float:
        self.reads += 1
        return self._readings[self.reads - 1]


class _LinearProducts(TorchFunctionMode):
    """Records the dtype of every linear product that runs inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) == "linear":
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


class _CountablePackedLinear(torch.nn.Module):
    """Stands in for oneDNN's PackedWeightLinear with the same product through F.linear, which
    FlopCounterMode counts (it cannot see oneDNN's own op)."""

    made = 0

    def __init__(self, linear: torch.nn.Linear, gelu: str | None = None) -> None:
        super().__init__()
        self.linear = linear
        type(self).made += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.linear.weight, self.linear.bias)


# One [16, 64] x [64, 256] product (rows=16, size=64): 16 x 256 outputs of 64 multiply-adds, 2 FLOPs each.
_PRODUCT_FLOPS = 524_288


def test_matmul_rate_is_the_products_flops_over_its_best_timing(monkeypatch):
    clock = _ScriptedClock([0.5, 0.25, 0.4])
    monkeypatch.setattr(cpu_features, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(cpu_features, "onednn_linear_available", lambda: True)
    monkeypatch.setattr(cpu_features, "PackedWeightLinear", _CountablePackedLinear)
    monkeypatch.setattr(_CountablePackedLinear, "made", 0)
    counter, products = FlopCounterMode(display=False), _LinearProducts()
    with counter, products:
        rate = matmul_rate(torch.float32, rows=16, size=64, repeats=3)
    # Through the packed kernel the backend uses, in fp32: a warm-up run, then 3 timed runs.
    assert _CountablePackedLinear.made == 1 and products.dtypes == [torch.float32] * 4
    assert counter.get_total_flops() == 4 * _PRODUCT_FLOPS
    assert clock.reads == 6  # the warm-up is not timed
    assert rate == _PRODUCT_FLOPS / 0.25  # the best of 0.5, 0.25 and 0.4 s


def test_matmul_rate_measures_bf16_where_onednn_cannot_pack_it(simulate_cpu, monkeypatch):
    simulate_cpu("epyc-avx2")  # packing a bf16 weight for oneDNN fails, as it does on AVX2 CPUs
    clock = _ScriptedClock([0.125])
    monkeypatch.setattr(cpu_features, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    counter, products = FlopCounterMode(display=False), _LinearProducts()
    with counter, products:
        rate = matmul_rate(torch.bfloat16, rows=16, size=64, repeats=1)
    # torch's own GEMM runs the same product instead, still in bf16.
    assert products.dtypes == [torch.bfloat16] * 2
    assert counter.get_total_flops() == 2 * _PRODUCT_FLOPS
    assert rate == _PRODUCT_FLOPS / 0.125


def test_auto_dtype_says_what_it_chose_and_why(m3_checkpoint, caplog, cpu_class):
    ckpt = load_checkpoint(str(m3_checkpoint))
    with caplog.at_level("INFO", logger="bgeserve.runtime.devices"):
        backend = TorchBackend(ckpt, options=BackendOptions(dtype="auto"))
    assert backend.dtype == cpu_class.auto_dtype
    assert np.isfinite(backend.run([[0, 5, 6, 2]], OutputRequest())[0].dense).all()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dtype auto -> ")]
    assert len(lines) == 1 and lines[0].startswith(f"dtype auto -> {cpu_class.auto_dtype} on cpu: ")
    assert len(lines[0].split(": ", 1)[1]) > 10  # the reason, not just the choice
