"""Rewrites an exported fp32 ONNX graph into int8: weights per output channel, activations per token.

See `quantize_int8` for why not onnxruntime's own `quantize_dynamic`, and for the two weight encodings
(u8 for AVX2 CPUs, s8 for CPUs with VNNI or AMX).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bgeserve.runtime.onnx_export import EXPORTER_VERSION, save_with_one_data_file

# The correction rows pad each product's K to a multiple of this, a whole number of the int8 kernels' K
# steps (measured as fast as the fewest rows, or up to 7% faster).
K_BLOCK = 16
# Part of the int8 exports' cache key: a changed rewrite (nodes, correction_rows' rule) must change it, so
# that no old export is reused.
INT8_REWRITE = f"in-product-correction-k{K_BLOCK}"


def quantize_int8(source: Path, path: Path, signed_weights: bool = False, keep_fp32: tuple[str, ...] = ()) -> Path:
    """Rewrites every encoder MatMul with a weight into int8: weights per output channel (symmetric),
    activations per token (asymmetric u8, range taken at run time).

    Why not `onnxruntime.quantization.quantize_dynamic`: it quantises activations with one range per
    tensor, which on the real all-MiniLM-L6-v2 keeps a minimum dense cosine of only ~0.966 vs fp32 over
    bgeserve/data/mixed.txt (per-token ranges: >= 0.995). onnxruntime's MatMulInteger takes only a
    scalar activation zero point, so the per-token zero points are corrected for separately:
    sum_k (q_mk - z_m) w_kn = (q @ w)_mn - z_m * colsum(w)_n, inside the product where that pays (see
    `correction_rows`), else after it. `signed_weights` stores the weights as s8, fast and exact only on
    CPUs with VNNI or AMX: elsewhere u8 x s8 products saturate at 16 bits, and the correction rows (a
    zero point up to 255 against codes near 127) are where they do most. Else the weights are u8 with zero
    point 128, exact on every x86-64 CPU.

    The word-embedding table and the small sparse / ColBERT heads stay fp32: the heads cost nothing and
    the sparse weights are the output most hurt by int8. `keep_fp32`: more node-name parts to leave fp32.
    """
    import onnx

    proto = onnx.load(str(source), load_external_data=True)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    dropped: set[str] = set()
    for index, node in enumerate(graph.node):
        weight = _weight_of(node, inits)
        if weight is None or _is_head(node.name) or any(p in node.name for p in keep_fp32):
            nodes.append(node)
            continue
        prefix = f"q8_{index}"
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        product = f"{prefix}/product" if bias else node.output[0]
        # A Gemm's input is [rows, K] by definition; a MatMul's may have more axes.
        rows = node.op_type == "Gemm"
        nodes += _int8_matmul_nodes(prefix, node.input[0], product, weight, signed_weights, added, rows)
        if bias:
            nodes.append(onnx.helper.make_node("Add", [product, bias], [node.output[0]]))
        if uses[node.input[1]] == 1:
            dropped.add(node.input[1])
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    proto.producer_version = f"{EXPORTER_VERSION}-int8"
    save_with_one_data_file(proto, path)
    return path


def _weight_of(node, inits: dict) -> np.ndarray | None:  # noqa: ANN001 - an onnx NodeProto
    """The [K, N] weight of a MatMul / Gemm (x @ W + b, as torch exports linear layers) with a constant
    2-D weight, else None."""
    from onnx import helper, numpy_helper

    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        return None
    weight = inits[node.input[1]]
    if len(weight.dims) != 2:
        return None
    w = numpy_helper.to_array(weight).astype(np.float32)
    if node.op_type == "MatMul":
        return w
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    return w.T if attrs.get("transB", 0) else w


def _is_head(node_name: str) -> bool:
    return "sparse_linear" in node_name or "colbert_linear" in node_name


def stored_weights(w_q: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights as the graph stores them, with their zero point: s8 around 0 (VNNI / AMX), or u8
    around 128 (what AVX2 multiplies without saturating)."""
    if signed:
        return w_q, np.array(0, np.int8)
    return (w_q.astype(np.int16) + 128).astype(np.uint8), np.array(128, np.uint8)


def correction_rows(w_q: np.ndarray, block: int = K_BLOCK) -> np.ndarray | None:
    """Extra int8 weight rows [J, N] whose sum, column by column, is -colsum(w_q): appended to the weights,
    with J copies of each row's activation zero point z_m appended to its codes, the int8 product itself
    subtracts z_m * colsum(w_q)_n, exactly, in its int32 accumulator. J is the fewest rows that hold
    max |colsum| at 127 a row, rounded up so that K + J is a multiple of `block`.

    None where that does not pay: for products with fewer outputs than inputs (the feed-forward's second
    product), the codes' Concat costs more than the [rows, N] correction pass it saves, and where J would
    exceed K / 8 the longer product does."""
    k, n = w_q.shape
    col_sum = w_q.astype(np.int64).sum(axis=0)
    needed = max(1, -(-int(np.abs(col_sum).max()) // 127))
    rows = -(-(k + needed) // block) * block - k
    if n < k or rows > k // 8:
        return None
    # Spread each column's sum evenly: every piece lies within [-127, 127] because rows >= needed.
    base, extra = np.divmod(-col_sum, rows)
    return (base[None, :] + (np.arange(rows)[:, None] < extra[None, :])).astype(np.int8)


def _int8_matmul_nodes(prefix: str, x: str, y: str, w: np.ndarray, signed: bool, inits: list, rows: bool) -> list:
    """Nodes computing y = x @ w (x [..., K], w [K, N]) with per-token u8 x and per-channel int8 w.

    `rows`: x is already [tokens, K] (a Gemm's input), so no reshapes around the product; on a short
    query such small nodes cost about as much as the products, which is also why the per-row range
    arithmetic below is kept to as few nodes as it can be. (A symmetric range per row, zero point fixed at
    128, would drop the zero-point correction too, but costs MiniLM's min cosine 0.995 -> 0.989.)
    """
    from onnx import TensorProto, numpy_helper
    from onnx import helper as oh

    k, n = w.shape
    w_scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
    w_q = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int8)

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, f"{prefix}/{name}"))
        return f"{prefix}/{name}"

    def t(name: str) -> str:
        return f"{prefix}/{name}"

    extra = correction_rows(w_q)
    stored, zero_point = stored_weights(w_q if extra is None else np.concatenate([w_q, extra]), signed)
    w_q_name, w_zp = const("w_q", stored), const("w_zp", zero_point)
    w_scale_name = const("w_scale", w_scale.astype(np.float32))
    zero, levels = const("zero", np.array(0, np.float32)), const("levels", np.array(255, np.float32))
    tiny, column = const("tiny", np.array(1e-12, np.float32)), const("column", np.array([1], np.int64))
    nodes = [] if rows else [oh.make_node("Reshape", [x, const("rows", np.array([-1, k], np.int64))], [t("x2")])]
    x2, y2 = (x, y) if rows else (t("x2"), t("y2"))
    nodes += [
        # Per-row ranges as [rows] vectors, the shape QuantizeLinear's per-row scale and zero point take.
        oh.make_node("ReduceMax", [x2], [t("max")], axes=[1], keepdims=0),
        oh.make_node("ReduceMin", [x2], [t("min")], axes=[1], keepdims=0),
        # The range always holds 0, so that zero (e.g. after ReLU-like activations) is exact; its top is
        # at least `tiny`, so that the scale of an all-zero row is not 0.
        oh.make_node("Max", [t("max"), tiny], [t("hi")]),
        oh.make_node("Min", [t("min"), zero], [t("lo")]),
        oh.make_node("Sub", [t("hi"), t("lo")], [t("range")]),
        oh.make_node("Div", [t("range"), levels], [t("scale")]),
        oh.make_node("Neg", [t("lo")], [t("neg_lo")]),
        oh.make_node("Div", [t("neg_lo"), t("scale")], [t("zp_raw")]),
        oh.make_node("Round", [t("zp_raw")], [t("zp")]),
        oh.make_node("Cast", [t("zp")], [t("zp_u8")], to=TensorProto.UINT8),
        oh.make_node("QuantizeLinear", [x2, t("scale"), t("zp_u8")], [t("x_q")], axis=0),
        # [rows, 1]: MatMulIntegerToFloat scales its output by a per-row A scale of this shape (in a pass of its
        # own over the output, but no node of ours); a [rows] vector would be taken for B's per-column scale.
        oh.make_node("Unsqueeze", [t("scale"), column], [t("row_scale")]),
    ]
    if extra is not None:
        # y = s_m * sum_k (q_mk - z_m) w_kn in one product: J copies of z_m after the codes meet the
        # correction rows after the weights (see correction_rows).
        nodes += [
            oh.make_node("Unsqueeze", [t("zp_u8"), column], [t("zp_col")]),
            oh.make_node("Tile", [t("zp_col"), const("copies", np.array([1, len(extra)], np.int64))], [t("zp_cols")]),
            oh.make_node("Concat", [t("x_q"), t("zp_cols")], [t("x_aug")], axis=1),
            oh.make_node(
                "MatMulIntegerToFloat",
                [t("x_aug"), w_q_name, t("row_scale"), w_scale_name, "", w_zp],
                [y2],
                domain="com.microsoft",
            ),
        ]
    else:
        # The correction after the product, y = s_m * acc_mn - (s_m z_m) * colsum(w)_n, as one rank-1
        # Gemm that adds into the scaled product.
        neg_col_sum = -(w_q.astype(np.int64).sum(axis=0, keepdims=True) * w_scale).astype(np.float32)
        nodes += [
            oh.make_node(
                "MatMulIntegerToFloat",
                [t("x_q"), w_q_name, t("row_scale"), w_scale_name, "", w_zp],
                [t("scaled")],
                domain="com.microsoft",
            ),
            oh.make_node("Unsqueeze", [t("zp"), column], [t("zp_col")]),
            oh.make_node("Mul", [t("zp_col"), t("row_scale")], [t("zs")]),
            oh.make_node("Gemm", [t("zs"), const("neg_col_sum", neg_col_sum), t("scaled")], [y2]),
        ]
    if not rows:
        nodes += [
            oh.make_node("Shape", [x], [t("lead")], start=0, end=-1),
            oh.make_node("Concat", [t("lead"), const("width", np.array([n], np.int64))], [t("out_shape")], axis=0),
            oh.make_node("Reshape", [t("y2"), t("out_shape")], [y]),
        ]
    return nodes
