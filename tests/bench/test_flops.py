"""The matmul-use figures: FLOPs per token from the config, a device's product rate, a row's share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bgeserve.bench.configs import BenchConfig
from bgeserve.bench.flops import matmul_shape, measure_matmul_tflops, projection_flops_per_token
from bgeserve.bench.job import JobOutcome
from bgeserve.bench.measure import Measurement
from bgeserve.bench.offline import Corpus, _row
from bgeserve.models.config import EncoderConfig
from bgeserve.models.encoder import TransformerEncoder
from bgeserve.runtime import cpu_features
from bgeserve.testing.synthetic import SIZES, _model_config


def _config(size: str, folder: Path) -> EncoderConfig:
    """The config.json the generator writes for `size` (no weights needed)."""
    shape = SIZES[size]
    path = folder / "config.json"
    path.write_text(json.dumps(_model_config(shape, shape.vocab_size or 250002)))
    return EncoderConfig.from_file(path)


def test_bge_m3_costs_the_issues_0_61_gflop_per_token(tmp_path: Path):
    # Per layer and token: QKV 1024 x 3072, attention output 1024 x 1024, feed-forward 1024 x 4096 and
    # 4096 x 1024 multiply-adds = 3,145,728 + 1,048,576 + 4,194,304 + 4,194,304 = 12,582,912; x 24 layers
    # x 2 FLOPs = 603,979,776 FLOPs.
    assert projection_flops_per_token(_config("full", tmp_path)) == 603_979_776


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_flops_per_token_are_what_the_encoder_runs(size: str, tmp_path: Path):
    """FlopCounterMode counts the matrix products of one forward pass of our encoder (on the meta device: no
    weights, bge-m3's own shapes): the projections (addmm) are exactly the formula's FLOPs per token."""
    config = _config(size, tmp_path)
    with torch.device("meta"):
        encoder = TransformerEncoder(config)
    tokens = 7
    ids = torch.full((1, tokens), 5, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        encoder(ids, torch.ones_like(ids))
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert counts.pop("aten.addmm") == tokens * projection_flops_per_token(config)
    # What is left out: attention scores and their weighted sum, 2 x 2 x tokens^2 x hidden per layer.
    assert counts == {"aten.bmm": config.num_layers * 4 * tokens**2 * config.hidden_size}


def test_product_rate_is_measured_in_the_rows_precision(monkeypatch):
    asked = []

    def rate(dtype: torch.dtype, rows: int, size: int) -> float:
        asked.append((dtype, rows, size))
        return 3.5e12

    monkeypatch.setattr(cpu_features, "matmul_rate", rate)
    assert measure_matmul_tflops("cpu", "fp32") == 3.5 and measure_matmul_tflops("cpu", "bf16") == 3.5
    # bge-m3's first feed-forward product on 2048 token rows, [2048, 1024] x [1024, 4096], in each row's dtype.
    assert asked == [(torch.float32, 2048, 1024), (torch.bfloat16, 2048, 1024)]
    assert matmul_shape("cpu") == "2048x1024x4096" and matmul_shape("cuda:0") == "8192^3"
    assert measure_matmul_tflops("cpu", "int8", size=64) is None and len(asked) == 2  # no plain int8 product


def _corpus() -> Corpus:
    return Corpus("t", ["a b", "c d e"], [4, 5], "a b", 4, ["a b"], 4)


def test_a_cuda_rows_share_of_the_cards_rate():
    measurement = Measurement(corpus_seconds=[0.5, 0.5], query_ms=[1.0], batch_ms=[2.0], matmul_tflops=400.0)
    row = _row(BenchConfig("cuda", "bf16"), [JobOutcome("ok", measurement=measurement)], _corpus(), 2e12, 1)
    # 9 tokens in 0.5 s = 18 tokens/s x 2 TFLOP per token = 36 TFLOP/s of 400: 9%.
    assert row.model_tflops == pytest.approx(36.0)
    assert row.device_tflops == 400.0 and row.matmul_use == pytest.approx(0.09)
    assert "matmul use 9% of 400 TFLOP/s" in "; ".join(row.notes)
    doc = row.as_dict()
    assert doc["matmul_use"] == pytest.approx(0.09) and doc["device_matmul_tflops"] == 400.0


def test_a_cpu_rows_share_of_its_bf16_product_rate():
    measurement = Measurement(corpus_seconds=[0.5], query_ms=[1.0], batch_ms=[2.0], matmul_tflops=2.0)
    row = _row(BenchConfig("cpu", "bf16"), [JobOutcome("ok", measurement=measurement)], _corpus(), 1e11, 1)
    # 18 tokens/s x 0.1 TFLOP per token = 1.8 TFLOP/s of 2.
    assert row.matmul_use == pytest.approx(0.9)
    assert "matmul use 90% of 2,000 GFLOP/s (bf16 2048x1024x4096 product here)" in "; ".join(row.notes)


def test_rows_without_a_device_rate_report_only_their_own():
    measurement = Measurement(corpus_seconds=[0.5], query_ms=[1.0], batch_ms=[2.0])
    row = _row(BenchConfig("cpu", "fp32"), [JobOutcome("ok", measurement=measurement)], _corpus(), 2e12, 1)
    assert row.model_tflops == pytest.approx(36.0)
    assert row.matmul_use is None and row.device_tflops is None and not row.notes
