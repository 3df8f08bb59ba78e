"""CUDA graphs for small batches: which batches replay a graph, and what the option does off CUDA.
The replay itself is checked against eager on a GPU (tests/runtime/test_cuda.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from bgeserve.api.settings import ServeSettings
from bgeserve.core import BackendOptions, OutputRequest
from bgeserve.models.checkpoint import load_checkpoint
from bgeserve.runtime.cuda_graphs import GRAPH_BATCHES, GRAPH_LENGTHS, GraphedForward, graph_shape
from bgeserve.runtime.factory import create_backend
from bgeserve.runtime.torch_backend import TorchBackend


def test_a_batch_replays_the_smallest_graph_that_holds_it():
    assert graph_shape(1, 9) == (1, 32)
    assert graph_shape(3, 33) == (4, 64)
    assert graph_shape(8, 128) == (8, 128)
    # Bigger than every captured shape, in texts or in tokens: the normal path.
    assert graph_shape(9, 10) is None and graph_shape(2, 129) is None
    assert graph_shape(0, 5) is None and graph_shape(2, 0) is None
    assert graph_shape(5, 100, batches=(2, 6), lengths=(100,)) == (6, 100)
    # graph_shape takes the first bucket that fits: the buckets must be in increasing order.
    assert sorted(GRAPH_BATCHES) == list(GRAPH_BATCHES) and sorted(GRAPH_LENGTHS) == list(GRAPH_LENGTHS)


def test_off_cuda_the_option_is_ignored_and_says_so(m3_checkpoint, caplog):
    ckpt = load_checkpoint(str(m3_checkpoint))
    ids = ckpt.tokenizer.encode(["a short text", "another one, a little longer"], max_length=64).ids
    with caplog.at_level(logging.INFO, logger="bgeserve.runtime.torch_backend"):
        graphed = TorchBackend(ckpt, options=BackendOptions(dtype="fp32", cuda_graphs=True))
    assert "CUDA graphs apply to CUDA devices only: not used on cpu" in caplog.text
    plain = TorchBackend(ckpt)
    for a, b in zip(graphed.run(ids, OutputRequest()), plain.run(ids, OutputRequest()), strict=True):
        np.testing.assert_array_equal(a.dense, b.dense)


def test_onnx_backend_refuses_cuda_graphs(m3_checkpoint):
    with pytest.raises(ValueError, match="--cuda-graphs applies to the torch backend only"):
        create_backend(load_checkpoint(str(m3_checkpoint)), "cpu", BackendOptions(backend="onnx", cuda_graphs=True))


def test_serve_flag_and_environment():
    import argparse

    def parse(argv, env):
        parser = argparse.ArgumentParser()
        ServeSettings.add_arguments(parser)
        return ServeSettings.from_sources(parser.parse_args(argv), env)

    assert parse([], {}).cuda_graphs is False
    assert parse(["--cuda-graphs"], {}).cuda_graphs is True
    assert parse([], {"BGESERVE_CUDA_GRAPHS": "1"}).cuda_graphs is True
    assert parse(["--no-cuda-graphs"], {"BGESERVE_CUDA_GRAPHS": "true"}).cuda_graphs is False


class _Replay:
    """Stands in for a captured graph on the CPU: replay reruns the forward on the static inputs."""

    def __init__(self, forward, ids, mask):
        self.forward, self.ids, self.mask = forward, ids, mask
        self.out = forward(ids, mask)

    def replay(self):
        self.out.copy_(self.forward(self.ids, self.mask))


class _CpuGraphs(GraphedForward):
    def _capture(self, forward, device, batch, length):
        ids = torch.full((batch, length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        replay = _Replay(forward, ids, mask)
        return replay, ids, mask, replay.out


def test_replay_bookkeeping_pads_into_the_bucket_and_returns_the_real_rows(m3_checkpoint):
    """Inputs copied into the bucket's buffers, the rest padding (one token each), output cut back to the
    batch's own shape: each row equals the model run on the batch alone."""
    from bgeserve.models.embedding_model import EmbeddingModel
    from bgeserve.models.packed import PackedBatch

    ckpt = load_checkpoint(str(m3_checkpoint))
    model = EmbeddingModel(ckpt).eval()
    graphs = _CpuGraphs(model, "cpu", ckpt.config.pad_token_id, batches=(1, 4), lengths=(32,))
    pad = ckpt.config.pad_token_id
    with torch.inference_mode():
        for texts in (["one"], ["a short text", "another, longer text with more words", "x"]):
            packed = PackedBatch.from_sequences(ckpt.tokenizer.encode(texts, max_length=32).ids)
            ids, mask = packed.pad(packed.ids, pad), packed.mask()
            got = graphs(ids, mask)
            assert got.shape[:2] == ids.shape
            expected = model(ids, mask)
            torch.testing.assert_close(got[packed.segment, packed.offset], expected[packed.segment, packed.offset])
        # Nothing of an earlier, bigger batch leaks into a smaller one in the same bucket.
        small = PackedBatch.from_sequences(ckpt.tokenizer.encode(["b", "c"], max_length=32).ids)
        got = graphs(small.pad(small.ids, pad), small.mask())
        expected = model(small.pad(small.ids, pad), small.mask())
        torch.testing.assert_close(got[small.segment, small.offset], expected[small.segment, small.offset])
        assert graphs(torch.ones(5, 8, dtype=torch.long), torch.ones(5, 8, dtype=torch.long)) is None
