"""GPU paths, run by scripts/gpu_check.sh on a machine with CUDA (`pytest -m gpu`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgeserve import Embedder
from bgeserve.core import BackendOptions, OutputRequest
from bgeserve.data import sample_texts
from bgeserve.models.checkpoint import load_checkpoint
from bgeserve.runtime.torch_backend import TorchBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CORPUS = sample_texts()
ODD = [
    "",
    " ",
    "a",
    "🚀" * 300,
    "北京" * 400,
    "\u200b\u200d\ufeff zero width",
    "word " * 2000,  # past the tiny model's 512-token limit: truncated
    "The quick brown fox jumps over the lazy dog. " * 40,
]


@pytest.fixture(scope="module")
def m3(m3_checkpoint):
    ckpt = load_checkpoint(str(m3_checkpoint))
    ids = ckpt.tokenizer.encode(ODD, max_length=ckpt.max_length).ids
    exact = TorchBackend(ckpt, "cpu", BackendOptions(dtype="fp32")).run(ids, OutputRequest(sparse=True, colbert=True))
    return ckpt, ids, exact


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_matches_cpu_fp32_without_nan(m3, dtype):
    """Odd inputs on the random tiny bge-m3: finite in every output, close to fp32. Random weights exaggerate
    bf16's error (bf16 rounding emulated on the CPU gives 0.99989 here, real MiniLM 0.99995), so the issue's
    0.9999 bar for half precision is asserted on real weights, below."""
    ckpt, ids, exact = m3
    out = TorchBackend(ckpt, "cuda:0", BackendOptions(dtype=dtype)).run(ids, OutputRequest(sparse=True, colbert=True))
    floor = {"fp32": 0.99999, "fp16": 0.9999, "bf16": 0.999}[dtype]
    for a, b in zip(exact, out, strict=True):
        assert np.isfinite(b.dense).all() and np.isfinite(b.colbert).all()
        assert float(a.dense @ b.dense) >= floor
        assert all(np.isfinite(v) for v in b.lexical_weights.values())


@pytest.fixture(scope="module")
def real_weights():
    """all-MiniLM-L6-v2's trained weights: $BGESERVE_GPU_TEST_MODEL (gpu_check.sh sets it to the fp16 copy that
    scripts/gpu_wheels.sh carries), else the bundled package; with the corpus plus the odd inputs."""
    import os

    from bgeserve.errors import ModelNotFound
    from bgeserve.models.checkpoint import bundled_model_path

    try:
        path = os.environ.get("BGESERVE_GPU_TEST_MODEL") or str(bundled_model_path())
    except ModelNotFound:
        pytest.skip("no real-weight model: set BGESERVE_GPU_TEST_MODEL (scripts/gpu_wheels.sh makes one)")
    ckpt = load_checkpoint(path)
    ids = ckpt.tokenizer.encode(CORPUS + ODD, max_length=ckpt.max_length).ids
    exact = TorchBackend(ckpt, "cpu", BackendOptions(dtype="fp32")).run(ids, OutputRequest())
    return ckpt, ids, np.stack([item.dense for item in exact])


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_keeps_the_bar_on_real_weights(real_weights, dtype):
    """The GPU bar: fp16/bf16 dense vectors within cosine 0.9999 of fp32, no NaN (CPU emulation of the
    same rounding: fp16 0.999999, bf16 0.99995 min over these texts)."""
    ckpt, ids, exact = real_weights
    backend = TorchBackend(ckpt, "cuda:0", BackendOptions(dtype=dtype))
    got = np.stack([item.dense for item in backend.run(ids, OutputRequest())])
    assert np.isfinite(got).all()
    assert (got * exact).sum(1).min() >= 0.9999


def test_auto_dtype_is_bf16_on_cuda_where_supported(m3_checkpoint):
    model = Embedder(str(m3_checkpoint), device="cuda")
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    assert model.device == "cuda:0" and model.dtype == expected


def test_replicas_on_every_visible_gpu(m3_checkpoint):
    import asyncio

    from bgeserve.engine.engine import EmbeddingEngine
    from bgeserve.runtime.devices import resolve_devices

    devices = resolve_devices("auto")
    assert devices == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    ckpt = load_checkpoint(str(m3_checkpoint))
    engine = EmbeddingEngine.from_checkpoint(ckpt, devices, BackendOptions(dtype="fp16"))
    assert engine.devices and all(d.startswith("cuda") for d in engine.devices)
    reference = Embedder(str(m3_checkpoint), device="cpu", dtype="fp32")
    texts = [f"text number {i} " * (1 + i % 7) for i in range(64)]
    expected = reference.encode(texts)["dense_vecs"]

    async def run():
        engine.start()
        try:
            results = await asyncio.gather(*(engine.encode([t], OutputRequest()) for t in texts))
        finally:
            await engine.stop()
        return np.stack([r.outputs[0].dense for r in results])

    got = asyncio.run(run())
    assert (got * expected).sum(1).min() >= 0.9999


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_packed_attention_on_cuda_equals_the_cpu_loop(dtype):
    """fp16/bf16 go through FlashAttention's varlen kernel, fp32 through the padded fallback: both keep to
    each sequence exactly as the CPU's one-SDPA-per-sequence loop does."""
    import warnings

    from bgeserve.models.packed import PackedBatch, packed_attention, per_sequence_attention

    gen = torch.Generator().manual_seed(0)
    lengths = [7, 1, 300, 12, 64]
    batch = PackedBatch.from_sequences([[5] * n for n in lengths])
    qkv = torch.randn(sum(lengths), 3, 16, 64, generator=gen)
    reference = per_sequence_attention(qkv, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent fallback from varlen would hide a broken fast path
        got = packed_attention(qkv.cuda().to(dtype), PackedBatch.from_sequences([[5] * n for n in lengths], "cuda"))
    tolerance = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(got.float().cpu(), reference, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_card_product_rate_for_the_matmul_use_column(dtype: str) -> None:
    """bench's `matmul use` divides by this: a real rate, in the tens of TFLOP/s or more on any recent card."""
    from bgeserve.bench.flops import measure_matmul_tflops

    rate = measure_matmul_tflops("cuda:0", dtype, size=4096, repeats=5)
    assert rate is not None and 5 < rate < 5000


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_cuda_graph_replays_equal_eager(m3_checkpoint, dtype: str) -> None:
    """Small batches replay captured graphs (padded buckets); bigger ones run packed. Both equal eager."""
    ckpt = load_checkpoint(str(m3_checkpoint))
    eager = TorchBackend(ckpt, "cuda:0", BackendOptions(dtype=dtype))
    graphed = TorchBackend(ckpt, "cuda:0", BackendOptions(dtype=dtype, cuda_graphs=True))
    want = OutputRequest(sparse=True, colbert=True)
    texts = ["q", "a short query", "a text of a few more words than that one " * 3, "x " * 200]
    batches = [texts[:1], texts[:3], texts[:2] * 4, texts[:3] * 3, texts]  # 1, 3, 8, 9 texts; the last > 128 tokens
    tolerance = 2e-3 if dtype == "fp16" else 1e-5
    for texts_in_batch in batches:
        ids = ckpt.tokenizer.encode(texts_in_batch, max_length=256).ids
        for a, b in zip(graphed.run(ids, want), eager.run(ids, want), strict=True):
            np.testing.assert_allclose(a.dense, b.dense, atol=tolerance)
            assert a.lexical_weights.keys() == b.lexical_weights.keys()
            np.testing.assert_allclose(a.colbert_vecs, b.colbert_vecs, atol=tolerance)
    # The same text gives the same vector whichever graph bucket its batch lands in.
    alone = graphed.run(ckpt.tokenizer.encode(texts[1:2], max_length=256).ids, want)[0].dense
    in_four = graphed.run(ckpt.tokenizer.encode(texts[:3] + texts[1:2], max_length=256).ids, want)[3].dense
    np.testing.assert_allclose(alone, in_four, atol=tolerance)
