"""The int8 rewrite's arithmetic, checked product by product against numpy on one-Gemm graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bgeserve.runtime import cpu_features  # noqa: E402
from bgeserve.runtime.onnx_int8 import K_BLOCK, correction_rows, quantize_int8  # noqa: E402


def test_correction_rows_cancel_each_column_sum_exactly():
    w_q = np.random.default_rng(0).integers(-127, 128, (256, 512)).astype(np.int8)
    rows = correction_rows(w_q)
    assert rows is not None and rows.dtype == np.int8
    assert (256 + len(rows)) % K_BLOCK == 0
    # The fewest rows that can hold the largest column sum at 127 a row, before the block padding.
    assert len(rows) >= -(-int(np.abs(w_q.astype(np.int64).sum(axis=0)).max()) // 127)
    assert np.array_equal(rows.astype(np.int64).sum(axis=0), -w_q.astype(np.int64).sum(axis=0))


def test_correction_rows_are_left_out_where_they_do_not_pay():
    gen = np.random.default_rng(1)
    # Fewer outputs than inputs: the codes' Concat costs more than the correction pass it saves.
    assert correction_rows(gen.integers(-127, 128, (256, 128)).astype(np.int8)) is None
    # Column sums of 256 * 127 would take 256 more rows: a product twice as long.
    assert correction_rows(np.full((256, 512), 127, np.int8)) is None
    # Columns that already sum to zero still get one block of (zero) rows, not none at all.
    balanced = np.concatenate([np.full((128, 256), 5, np.int8), np.full((128, 256), -5, np.int8)])
    assert np.array_equal(correction_rows(balanced), np.zeros((K_BLOCK, 256), np.int8))


def _one_product_graph(path: Path, w: np.ndarray, b: np.ndarray, op: str) -> Path:
    """y = x @ w + b as torch exports a linear layer on [tokens, K] rows (Gemm, weight stored [N, K]), or
    y = x @ w on [batch, seq, K] (MatMul, weight [K, N], no bias)."""
    k, n = w.shape
    if op == "Gemm":
        nodes = [helper.make_node("Gemm", ["x", "layer.weight", "layer.bias"], ["y"], name="/layer/Gemm", transB=1)]
        inits = [
            numpy_helper.from_array(np.ascontiguousarray(w.T), "layer.weight"),
            numpy_helper.from_array(b, "layer.bias"),
        ]
        shape_in, shape_out = ["tokens", k], ["tokens", n]
    else:
        nodes = [helper.make_node("MatMul", ["x", "layer.weight"], ["y"], name="/layer/MatMul")]
        inits = [numpy_helper.from_array(w, "layer.weight")]
        shape_in, shape_out = ["batch", "seq", k], ["batch", "seq", n]
    graph = helper.make_graph(
        nodes,
        "one_product",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _reference_int8(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rewrite's recipe in numpy: per-channel symmetric weights, per-row asymmetric u8 activations."""
    w_scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
    w_q = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int64)
    hi, lo = np.maximum(x.max(axis=1), 1e-12), np.minimum(x.min(axis=1), 0.0)
    scale = (hi - lo) / 255.0
    zero = np.rint(-lo / scale)
    q = np.clip(np.rint(x / scale[:, None]) + zero[:, None], 0, 255).astype(np.int64)
    return (scale[:, None] * ((q - zero[:, None].astype(np.int64)) @ w_q) * w_scale + b).astype(np.float32)


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize(("k", "n", "in_product"), [(128, 256, True), (256, 128, False)])
def test_int8_product_is_the_integer_recipe(tmp_path, op, signed, k, n, in_product):
    """Both corrections of the activation zero points (inside the product, or a rank-1 Gemm after it) give
    the recipe's result, for both weight encodings and both product nodes; a wrong correction would be off
    by z * colsum."""
    if signed and not cpu_features.cpu_has_vnni():
        pytest.skip("s8 weights are exact only on CPUs with VNNI or AMX (u8 x s8 saturates elsewhere)")
    gen = np.random.default_rng(2)
    w = (gen.standard_normal((k, n)) * 0.05).astype(np.float32)
    b = gen.standard_normal(n).astype(np.float32) if op == "Gemm" else np.zeros(n, np.float32)
    # Rows with different ranges and skews, all-positive and all-zero rows among them.
    x = (gen.standard_normal((9, k)) * gen.uniform(0.1, 5.0, (9, 1)) + gen.uniform(-1, 2, (9, 1))).astype(np.float32)
    x[3] = np.abs(x[3])
    x[5] = 0.0
    source = _one_product_graph(tmp_path / "fp32.onnx", w, b, op)
    (tmp_path / "int8").mkdir()
    rewritten = quantize_int8(source, tmp_path / "int8" / "model.onnx", signed_weights=signed)
    ops = [node.op_type for node in onnx.load(str(rewritten), load_external_data=False).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 1 and "MatMul" not in ops
    assert ("Tile" in ops, "Gemm" in ops) == ((True, False) if in_product else (False, True))
    session = ort.InferenceSession(str(rewritten), providers=["CPUExecutionProvider"])
    feed = x if op == "Gemm" else x.reshape(3, 3, k)
    y = session.run(None, {"x": feed})[0].reshape(9, n)
    expected = _reference_int8(x, w, b)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-4 * float(np.abs(expected).max()))
    # And it is what int8 should be: close to the fp32 product.
    exact = x @ w + b
    nonzero = np.abs(exact).sum(axis=1) > 0
    cosine = np.sum(y * exact, axis=1)[nonzero] / (np.linalg.norm(y, axis=1) * np.linalg.norm(exact, axis=1))[nonzero]
    assert cosine.min() > 0.999
