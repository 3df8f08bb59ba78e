"""Packed (padding-free) execution gives what the padded layout gives, for every output."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from bgeserve.core import OutputRequest
from bgeserve.data import sample_texts
from bgeserve.models.checkpoint import load_checkpoint
from bgeserve.models.embedding_model import EmbeddingModel
from bgeserve.models.packed import (
    GROUP_QUADRATIC_LENGTH,
    GROUP_RUN_COST,
    PackedBatch,
    attention_groups,
    padded_attention,
    per_sequence_attention,
)
from bgeserve.runtime.torch_backend import TorchBackend

TEXTS = sample_texts()[:24]
# Lengths from 3 tokens to hundreds, a literal "<pad>" inside a text (XLM-R positions skip it) and a repeat.
TEXTS += ["hi", "a <pad> inside", " ".join(TEXTS[:6]), TEXTS[0]]
EVERYTHING = OutputRequest(dense=True, sparse=True, colbert=True, token_embeddings=True)


def _padded_hidden(model: EmbeddingModel, ids: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    width = max(map(len, ids))
    padded = torch.full((len(ids), width), pad_id)
    mask = torch.zeros_like(padded)
    for row, seq in enumerate(ids):
        padded[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    hidden = model(padded, mask)
    return [hidden[row, : len(seq)] for row, seq in enumerate(ids)]


@pytest.mark.parametrize("which", ["m3", "minilm"])
@torch.inference_mode()
def test_packed_encoder_equals_padded(which, m3_checkpoint, minilm_path):
    """XLM-R (positions from ids) and BERT (positions by index) both: every real token's hidden state."""
    ckpt = load_checkpoint(str(m3_checkpoint if which == "m3" else minilm_path))
    model = EmbeddingModel(ckpt)
    ids = ckpt.tokenizer.encode(TEXTS, max_length=256).ids
    expected = _padded_hidden(model, ids, ckpt.config.pad_token_id)
    packed = model.forward_packed(PackedBatch.from_sequences(ids))
    assert packed.shape[0] == sum(map(len, ids))  # not one padding row
    for want, got in zip(expected, packed.split([len(x) for x in ids]), strict=True):
        assert (want - got).abs().max().item() <= 1e-5


def test_padded_attention_equals_per_sequence():
    """The CUDA fp32 fallback (scatter to a padded batch, masked SDPA) against the CPU per-sequence loop."""
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 1, 30, 12]
    batch = PackedBatch.from_sequences([[5] * n for n in lengths])
    qkv = torch.randn(sum(lengths), 3, 4, 8, generator=gen)
    loop, padded = per_sequence_attention(qkv, batch), padded_attention(qkv, batch)
    assert loop.shape == (sum(lengths), 32)
    torch.testing.assert_close(padded, loop, atol=1e-6, rtol=1e-5)
    # Attention stays inside a sequence: changing one sequence leaves the others' rows alone.
    qkv2 = qkv.clone()
    qkv2[:7] += 1.0
    assert torch.equal(per_sequence_attention(qkv2, batch)[7:], loop[7:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_runs_the_fused_kernel_not_the_math_fallback(dtype):
    from torch.profiler import ProfilerActivity, profile

    lengths = [9, 3, 40]
    batch = PackedBatch.from_sequences([[5] * n for n in lengths])
    qkv = torch.randn(sum(lengths), 3, 4, 16).to(dtype)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = per_sequence_attention(qkv, batch)
    ops = {event.name for event in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops, sorted(ops)
    assert "aten::_scaled_dot_product_attention_math" not in ops
    # Same numbers as attention written out in fp32, one sequence at a time.
    start = 0
    for n in lengths:
        q, k, v = qkv[start : start + n].float().permute(1, 2, 0, 3)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        expected = (weights @ v).transpose(0, 1).reshape(n, -1)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[start : start + n].float(), expected, atol=tolerance, rtol=tolerance)
        start += n


def test_packed_batch_layout():
    batch = PackedBatch.from_sequences([[1, 2, 3], [4], [5, 6]])
    assert batch.ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert batch.starts.tolist() == [0, 3, 4]
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert batch.offset.tolist() == [0, 1, 2, 0, 0, 1]
    assert batch.pad(batch.ids, -1).tolist() == [[1, 2, 3], [4, -1, -1], [5, 6, -1]]
    assert batch.mask().tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    with pytest.raises(ValueError):
        PackedBatch.from_sequences([[1], []])


@pytest.mark.parametrize("which", ["m3", "minilm"])
def test_backend_packed_outputs_equal_padded(which, m3_checkpoint, minilm_path):
    """Every output of the backend's packed path equals its padded (compile) layout: dense, sparse keys in
    the same order, ColBERT rows, token embeddings."""
    ckpt = load_checkpoint(str(m3_checkpoint if which == "m3" else minilm_path))
    backend = TorchBackend(ckpt)
    want = EVERYTHING if which == "m3" else OutputRequest(token_embeddings=True)
    ids = ckpt.tokenizer.encode(TEXTS, max_length=256).ids
    packed = backend.run(ids, want)
    backend._compiled = True  # the padded, length-bucketed layout that compiled graphs get, run eagerly
    padded = backend.run(ids, want)
    for a, b in zip(padded, packed, strict=True):
        assert a.num_tokens == b.num_tokens
        np.testing.assert_allclose(b.dense, a.dense, atol=1e-5)
        np.testing.assert_allclose(b.token_embeddings, a.token_embeddings, atol=1e-5)
        if which == "m3":
            assert list(b.lexical_weights) == list(a.lexical_weights)
            np.testing.assert_allclose(list(b.lexical_weights.values()), list(a.lexical_weights.values()), atol=1e-5)
            assert b.colbert.shape == (a.num_tokens - 1, a.colbert.shape[1])
            np.testing.assert_allclose(b.colbert, a.colbert, atol=1e-5)


def _grouping_cost(lengths: list[int], groups: list[list[int]]) -> float:
    """attention_groups' cost model with its default constants, for any grouping."""
    widths = [(len(g), max(lengths[i] for i in g)) for g in groups]
    return sum(GROUP_RUN_COST + n * width * (1 + width / GROUP_QUADRATIC_LENGTH) for n, width in widths)


def test_attention_groups_keep_a_long_text_apart_and_let_a_few_short_ones_join_their_neighbour():
    # One 512-token text would pad 31 short ones ~16x: it runs alone. Three texts of 24-25 tokens beside 24 of
    # 28-51 cost more as a run of their own than padded to 51, so they join that group.
    assert attention_groups([512] + [30] * 31) == [[0], list(range(1, 32))]
    mid = list(range(51, 27, -1))
    groups = attention_groups(mid + [25, 24, 24])
    assert groups == [list(range(27))]
    assert attention_groups([7, 7, 7]) == [[0, 1, 2]]
    assert attention_groups([]) == []
    # Each group holds indices, longest first, and every index comes out once.
    lengths = [5, 100, 40, 60, 51, 3]
    groups = attention_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(6))
    in_groups = [[lengths[i] for i in g] for g in groups]
    assert all(group == sorted(group, reverse=True) for group in in_groups)
    # A run that costs nothing fixed leaves every distinct length its own group; a dear one merges all.
    assert attention_groups([300, 200, 100], run_cost=0) == [[0], [1], [2]]
    assert attention_groups([300, 200, 100], run_cost=1e9) == [[0, 1, 2]]


def test_attention_groups_are_the_cheapest_contiguous_grouping():
    """Against every way of cutting the lengths, sorted longest first, into consecutive groups."""
    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(1, 400) for _ in range(rng.randint(1, 9))]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        best = min(
            _grouping_cost(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)), strict=True)])
            for r in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), r)
        )
        chosen = _grouping_cost(lengths, attention_groups(lengths))
        assert chosen == pytest.approx(best)


@pytest.mark.parametrize("which", ["m3", "minilm"])
def test_the_last_layer_runs_on_the_rows_a_request_reads(which, m3_checkpoint, minilm_path):
    """A dense request of a CLS-pooled model reads one row a text: the last layer's feed-forward runs on
    those rows only, and the vectors are the full pass's. Mean pooling (MiniLM) reads every row."""
    ckpt = load_checkpoint(str(m3_checkpoint if which == "m3" else minilm_path))
    backend = TorchBackend(ckpt)
    ids = ckpt.tokenizer.encode(TEXTS, max_length=256).ids
    tokens = sum(len(seq) for seq in ids)
    rows: list[int] = []
    hook = backend.model.encoder.layers[-1].ffn_in.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    dense_only = backend.run(ids, OutputRequest())
    full = backend.run(ids, EVERYTHING if which == "m3" else OutputRequest(token_embeddings=True))
    hook.remove()
    assert rows == [len(ids) if which == "m3" else tokens, tokens]
    for a, b in zip(dense_only, full, strict=True):
        np.testing.assert_allclose(a.dense, b.dense, atol=1e-5)
