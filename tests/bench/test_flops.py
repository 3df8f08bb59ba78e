"""The matmul-use figures: FLOPs per token from the config, a device's product rate, a row's share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bgeserve.bench.configs import BenchConfig
from bgeserve.bench.flops import matmul_shape, measure_matmul_tflops, projection_flops_per_token
from bgeserve.bench.job import JobOutcome
from bgeserve.bench.measure import Measurement
from bgeserve.bench.offline import Corpus, _row
from bgeserve.models.config import EncoderConfig
from bgeserve.testing.synthetic import SIZES, _model_config


def _config(size: str, folder: Path) -> EncoderConfig:
    """The config.json the generator writes for `size` (no weights needed)."""
    shape = SIZES[size]
    path = folder / "config.json"
    path.write_text(json.dumps(_model_config(shape, shape.vocab_size or 250002)))
    return EncoderConfig.from_file(path)


def test_bge_m3_costs_the_issues_0_61_gflop_per_token(tmp_path: Path):
    flops = projection_flops_per_token(_config("full", tmp_path))
    # 24 layers x (4 x 1024^2 + 2 x 1024 x 4096) multiply-adds, x 2 FLOPs each.
    assert flops == 2 * 24 * (4 * 1024**2 + 2 * 1024 * 4096)
    assert flops / 1e9 == pytest.approx(0.604, abs=0.001)


def test_product_rate_is_measured_in_the_rows_precision():
    rate = measure_matmul_tflops("cpu", "fp32")
    assert rate is not None and 0 < rate < 100  # TFLOP/s: any CPU lands far below 100
    assert matmul_shape("cpu") == "2048x1024x4096" and matmul_shape("cuda:0") == "8192^3"
    assert measure_matmul_tflops("cpu", "int8", size=64) is None  # no plain int8 product to time


def _corpus() -> Corpus:
    return Corpus("t", ["a b", "c d e"], [4, 5], "a b", 4, ["a b"], 4)


def test_a_cuda_rows_share_of_the_cards_rate():
    measurement = Measurement(corpus_seconds=[0.5, 0.5], query_ms=[1.0], batch_ms=[2.0], matmul_tflops=400.0)
    row = _row(BenchConfig("cuda", "bf16"), JobOutcome("ok", measurement=measurement), _corpus(), 2e12)
    # 9 tokens in 0.5 s = 18 tokens/s x 2 TFLOP per token = 36 TFLOP/s of 400: 9%.
    assert row.model_tflops == pytest.approx(36.0)
    assert row.device_tflops == 400.0 and row.matmul_use == pytest.approx(0.09)
    assert "matmul use 9% of 400 TFLOP/s" in "; ".join(row.notes)
    doc = row.as_dict()
    assert doc["matmul_use"] == pytest.approx(0.09) and doc["device_matmul_tflops"] == 400.0


def test_a_cpu_rows_share_of_its_bf16_product_rate():
    measurement = Measurement(corpus_seconds=[0.5], query_ms=[1.0], batch_ms=[2.0], matmul_tflops=2.0)
    row = _row(BenchConfig("cpu", "bf16"), JobOutcome("ok", measurement=measurement), _corpus(), 1e11)
    # 18 tokens/s x 0.1 TFLOP per token = 1.8 TFLOP/s of 2.
    assert row.matmul_use == pytest.approx(0.9)
    assert "matmul use 90% of 2,000 GFLOP/s (bf16 2048x1024x4096 product here)" in "; ".join(row.notes)


def test_rows_without_a_device_rate_report_only_their_own():
    measurement = Measurement(corpus_seconds=[0.5], query_ms=[1.0], batch_ms=[2.0])
    row = _row(BenchConfig("cpu", "fp32"), JobOutcome("ok", measurement=measurement), _corpus(), 2e12)
    assert row.model_tflops == pytest.approx(36.0)
    assert row.matmul_use is None and row.device_tflops is None and not row.notes
