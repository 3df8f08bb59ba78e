"""Exports our EmbeddingModel (encoder + every head) to one ONNX graph, quantises it, and caches both.

The graph runs packed batches (no projection FLOP on padding), like the torch backend. Inputs, all
int64 with dynamic axes (see models.packed.PackedBatch for how they are made):

- `input_ids`, `position_ids` [tokens]: every sequence's ids back to back, and their position ids
- `gather_index`, `attention_mask` [batch, seq]: the padded layout attention runs in
- `scatter_index` [tokens]: each token's place in that layout

Outputs, one row per token:

- `last_hidden_state` [tokens, hidden]
- `token_weights` [tokens]: relu(sparse_linear(H)), only when the checkpoint has the sparse head
- `colbert` [tokens, dim]: colbert_linear(H) L2-normalised, only with the ColBERT head (CLS rows included)

Pooling, lexical weights and splitting per sequence happen on the host (runtime.packed_outputs), as for
the torch backend.

Exported files are cached in `<model dir>/bgeserve-onnx/` when that directory is writable, else in a
cache directory, under a key made of each source file's name, size and mtime (no hashing of gigabytes
of weights on every start), the exporter version, the torch version and the opset.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Collection
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bgeserve.models.checkpoint import Checkpoint
from bgeserve.models.config import EncoderConfig
from bgeserve.models.embedding_model import EmbeddingModel
from bgeserve.models.encoder import packed_positions
from bgeserve.models.heads import token_weights
from bgeserve.models.packed import PackedBatch, gathered_attention

log = logging.getLogger(__name__)

# Bump whenever the exported graph changes (outputs, ops, quantisation recipe): old caches are ignored.
EXPORTER_VERSION = "bgeserve-onnx-5-fused-attention"
OPSET = 17
INPUT_NAMES = ("input_ids", "position_ids", "gather_index", "attention_mask", "scatter_index")
HIDDEN, TOKEN_WEIGHTS, COLBERT = "last_hidden_state", "token_weights", "colbert"
MODEL_FILE = "model.onnx"
# Weights always go to one side file: the ONNX protobuf itself cannot exceed 2 GB (bge-m3 is 2.27 GB).
DATA_FILE = "model.onnx.data"
CACHE_SUBDIR = "bgeserve-onnx"
ONNX_DTYPES = ("fp32", "int8")
# Exported graph outputs; the sparse and ColBERT ones only when the checkpoint has those heads.


def default_cache_dir() -> Path:
    """`~/.cache/bgeserve/onnx`, used when the model directory is read-only and no cache dir is given."""
    return Path.home() / ".cache" / "bgeserve" / "onnx"


class ExportGraph(nn.Module):
    """What gets traced: the encoder and every head the checkpoint has, in one forward."""

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__()
        self.model = model

    def output_names(self) -> list[str]:
        names = [HIDDEN]
        if self.model.sparse_linear is not None:
            names.append(TOKEN_WEIGHTS)
        if self.model.colbert_linear is not None:
            names.append(COLBERT)
        return names

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        gather_index: torch.Tensor,
        attention_mask: torch.Tensor,
        scatter_index: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        # The key mask is made once here, not once per layer.
        key_padding = attention_mask.to(torch.int32)
        attend = partial(
            multi_head_attention,
            gather_index=gather_index,
            key_padding=key_padding,
            scatter_index=scatter_index,
            heads=self.model.encoder.cfg.num_heads,
        )
        hidden = self.model.encoder.encode_tokens(input_ids, position_ids, attend)
        outputs = [hidden]
        if self.model.sparse_linear is not None:
            outputs.append(token_weights(hidden, self.model.sparse_linear))
        if self.model.colbert_linear is not None:
            outputs.append(F.normalize(self.model.colbert_linear(hidden), dim=-1))
        return tuple(outputs)


class _MultiHeadAttention(torch.autograd.Function):
    """Masked self-attention over [B, S, heads * head_dim] q, k, v that exports as onnxruntime's fused
    com.microsoft MultiHeadAttention: one node per layer where SDPA traced to ~25 (transposes, shape
    arithmetic, two matrix products, mask, softmax): int8 batches of short texts run 3-5% faster (BENCHMARKS
    run 7). Tracing runs `forward`, the same attention in torch."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding, heads: int):  # noqa: ANN001, ANN205 - autograd.Function's protocol
        batch, width, hidden = q.shape
        q, k, v = (t.view(batch, width, heads, hidden // heads).transpose(1, 2) for t in (q, k, v))
        mask = key_padding.to(torch.bool)[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(batch, width, hidden)

    @staticmethod
    def symbolic(g, q, k, v, key_padding, heads: int):  # noqa: ANN001, ANN205
        # Inputs: query, key, value, [bias], key_padding_mask; the empty bias slot is put in after export
        # (see _fill_attention_bias_slot): the TorchScript exporter has no public way to write one.
        return g.op("com.microsoft::MultiHeadAttention", q, k, v, key_padding, num_heads_i=heads)


def multi_head_attention(
    qkv: torch.Tensor, gather_index: torch.Tensor, key_padding: torch.Tensor, scatter_index: torch.Tensor, heads: int
) -> torch.Tensor:
    """models.packed.gathered_attention around onnxruntime's fused attention. `key_padding` is the [B, S]
    int32 mask (1 = a token). `heads` comes from the config, not from a traced shape: the exporter takes an
    attribute only from a plain Python value."""

    def fused(padded: torch.Tensor) -> torch.Tensor:
        return _MultiHeadAttention.apply(*padded.unbind(2), key_padding, heads)

    return gathered_attention(qkv, gather_index, scatter_index, fused)


def _fill_attention_bias_slot(graph) -> None:  # noqa: ANN001 - an onnx GraphProto
    """MultiHeadAttention(q, k, v, mask) as traced -> (q, k, v, "", mask): the mask is its fifth input."""
    for node in graph.node:
        if node.op_type == "MultiHeadAttention" and len(node.input) == 4:
            node.input.insert(3, "")


def packed_inputs(batch: PackedBatch, cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """The graph's inputs for a packed batch (CPU tensors, int64)."""
    return {
        "input_ids": batch.ids,
        "position_ids": packed_positions(batch, cfg),
        "gather_index": batch.gather_index(),
        "attention_mask": batch.mask(),
        "scatter_index": batch.scatter_index(),
    }


def _source_files(checkpoint: Checkpoint) -> list[Path]:
    """Every file whose change changes the exported graph."""
    files = [checkpoint.weights_file, checkpoint.path / "config.json"]
    files += [f for f in (checkpoint.sparse_head, checkpoint.colbert_head) if f is not None]
    return files


def cache_key(checkpoint: Checkpoint) -> str:
    """Key of an export: source files' name + size + mtime, exporter and torch versions, opset."""
    digest = hashlib.sha256()
    for part in (EXPORTER_VERSION, torch.__version__, str(OPSET)):
        digest.update(part.encode() + b"\0")
    for file in _source_files(checkpoint):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:20]


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def cache_location(checkpoint: Checkpoint, dtype: str, cache_dir: Path | None = None, key: str | None = None) -> Path:
    """Directory holding the `dtype` export: an explicit `cache_dir` wins, then the model directory when
    writable (and not inside an installed package), then `default_cache_dir()`. `key`: cache_key(checkpoint)
    when the caller has it already."""
    name = f"{key or cache_key(checkpoint)}-{dtype}"
    if cache_dir is not None:
        return Path(cache_dir) / f"{_safe(checkpoint.name)}-{name}"
    beside = checkpoint.path / CACHE_SUBDIR
    # A model shipped inside a Python package (the bundled MiniLM) is not ours to write into.
    installed = any(part in ("site-packages", "dist-packages") for part in checkpoint.path.parts)
    if not installed and _writable_dir(beside):
        return beside / name
    return default_cache_dir() / f"{_safe(checkpoint.name)}-{name}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "model"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's feature flags in `cpuinfo` (`avx2`, `avx512_vnni`, `amx_int8`, ...); empty when
    unreadable (not Linux)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_vnni(flags: Collection[str] | None = None) -> bool:
    """True when the CPU multiplies u8 x s8 without 16-bit saturation (AVX512-VNNI, AVX-VNNI, AMX).
    `flags`: /proc/cpuinfo's, as cpu_flags() reads them (the default)."""
    return bool(set(cpu_flags() if flags is None else flags) & {"avx512_vnni", "avx_vnni", "amx_int8"})


def ensure_onnx_model(
    checkpoint: Checkpoint, dtype: str = "fp32", cache_dir: Path | None = None, signed_weights: bool | None = None
) -> Path:
    """Path of the cached `model.onnx` for `dtype` ("fp32" or "int8"), exporting it first when absent.

    int8 weights are signed where the CPU has VNNI (fast u8 x s8 products), else unsigned: AVX2's
    u8 x s8 instruction saturates at 16 bits, which on MiniLM costs ~0.06 of minimum cosine.
    `signed_weights` overrides the detection.
    """
    if dtype not in ONNX_DTYPES:
        raise ValueError(f"no ONNX export for dtype {dtype!r}: use {' or '.join(ONNX_DTYPES)}")
    signed = dtype == "int8" and (cpu_has_vnni() if signed_weights is None else signed_weights)
    variant = "fp32" if dtype == "fp32" else "int8s8" if signed else "int8u8"
    key = cache_key(checkpoint)
    target = cache_location(checkpoint, variant, cache_dir, key)
    if (target / MODEL_FILE).is_file():
        log.info("reusing ONNX export %s", target)
        return target / MODEL_FILE
    if dtype == "fp32":
        return _publish(target, lambda tmp: export_onnx(checkpoint, tmp / MODEL_FILE), key)
    source = ensure_onnx_model(checkpoint, "fp32", cache_dir)
    log.info("quantising %s to int8 (%s weights) ...", checkpoint.name, "s8" if signed else "u8")
    return _publish(target, lambda tmp: quantize_int8(source, tmp / MODEL_FILE, signed_weights=signed), key)


def _publish(target: Path, build, key: str) -> Path:  # noqa: ANN001 - a callable taking the staging dir
    """Builds into a staging directory beside `target`, then renames it into place: readers never see a
    half-written export, and when two replicas export at once the first rename wins. Exports of the same
    model and dtype under another key (older weights, bgeserve or torch) are removed after: bge-m3's
    are 2.3 GB each. A process still reading one keeps its open files until it exits."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        # mkdtemp makes the directory private; a shared cache must be readable by every user.
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
        try:
            staging.rename(target)
        except OSError:
            if not (target / MODEL_FILE).is_file():
                raise
            log.info("another process exported %s first; using it", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for stale in target.parent.glob(target.name.replace(key, "?" * len(key))):
        if stale != target and stale.is_dir():
            log.info("removing an older ONNX export: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
    return target / MODEL_FILE


def export_onnx(checkpoint: Checkpoint, path: Path, model: EmbeddingModel | None = None) -> Path:
    """Traces the fp32 model with torch's TorchScript exporter and writes `path` + `model.onnx.data`."""
    import onnx

    graph = ExportGraph(model if model is not None else EmbeddingModel(checkpoint))
    graph = graph.float().eval()
    names = graph.output_names()
    # Two sequences of different lengths: the traced graph must not specialise on "no padding".
    cfg = checkpoint.config
    sample = PackedBatch.from_sequences([[0, 5, 6, 7, 8, 9, 10, 2], [0, 5, 6, 2]])
    inputs = packed_inputs(sample, cfg)
    axes = {name: {0: "tokens"} for name in ("input_ids", "position_ids", "scatter_index", *names)}
    axes |= {name: {0: "batch", 1: "seq"} for name in ("gather_index", "attention_mask")}
    raw_dir = path.parent / "raw"
    raw_dir.mkdir()
    log.info("exporting %s to ONNX (opset %d) ...", checkpoint.name, OPSET)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of the dynamo one (which needs onnxscript); it
        # still traces this model exactly, and its deprecation and tracer warnings are noise to users.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            tuple(inputs[name] for name in INPUT_NAMES),
            str(raw_dir / MODEL_FILE),
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=names,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    # Above 2 GB torch writes one file per tensor next to the graph; re-save as one graph + one data file.
    proto = onnx.load(str(raw_dir / MODEL_FILE), load_external_data=True)
    _fill_attention_bias_slot(proto.graph)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    proto.producer_name, proto.producer_version = "bgeserve", EXPORTER_VERSION
    _save_with_one_data_file(proto, path)
    del proto
    shutil.rmtree(raw_dir)
    return path


def quantize_int8(source: Path, path: Path, signed_weights: bool = False, keep_fp32: tuple[str, ...] = ()) -> Path:
    """Rewrites every encoder MatMul with a weight into int8: weights per output channel (symmetric),
    activations per token (asymmetric u8, range taken at run time).

    Why not `onnxruntime.quantization.quantize_dynamic`: it quantises activations with one range per
    tensor, which on the real all-MiniLM-L6-v2 keeps a minimum dense cosine of only ~0.966 vs fp32 over
    bgeserve/data/mixed.txt (per-token ranges: >= 0.995). onnxruntime's MatMulInteger takes only a
    scalar activation zero point, so the per-token zero points are applied afterwards:
    sum_k (q_mk - z_m) w_kn = (q @ w)_mn - z_m * colsum(w)_n. `signed_weights` stores the weights as
    s8 (fast on VNNI CPUs), else as u8 with zero point 128 (exact on AVX2, whose u8 x s8 saturates).

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
    nodes, added, dropped = [], [], set()
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
    _save_with_one_data_file(proto, path)
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


def _int8_matmul_nodes(prefix: str, x: str, y: str, w: np.ndarray, signed: bool, inits: list, rows: bool) -> list:
    """Nodes computing y = x @ w (x [..., K], w [K, N]) with per-token u8 x and per-channel int8 w.

    `rows`: x is already [tokens, K] (a Gemm's input), so no reshapes around the product; on a short
    query such small nodes cost about as much as the products. (A symmetric range per row, zero point
    fixed at 128, would drop the zero-point correction too, but costs MiniLM's min cosine 0.995 -> 0.989.)
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

    if signed:
        w_q_name, w_zp = const("w_q", w_q), const("w_zp", np.array(0, np.int8))
    else:
        w_q_name = const("w_q", (w_q.astype(np.int16) + 128).astype(np.uint8))
        w_zp = const("w_zp", np.array(128, np.uint8))
    # The zero-point correction in output units: colsum(w_q)_n * w_scale_n.
    col_sum = const("col_sum", (w_q.astype(np.int64).sum(axis=0, keepdims=True) * w_scale).astype(np.float32))
    w_scale_name = const("w_scale", w_scale.astype(np.float32))
    one = const("one", np.array(1, np.float32))
    zero, levels = const("zero", np.array(0, np.float32)), const("levels", np.array(255, np.float32))
    tiny, flat = const("tiny", np.array(1e-12, np.float32)), const("flat", np.array([-1], np.int64))
    nodes = [] if rows else [oh.make_node("Reshape", [x, const("rows", np.array([-1, k], np.int64))], [t("x2")])]
    x2, y2 = (x, y) if rows else (t("x2"), t("y2"))
    nodes += [
        oh.make_node("ReduceMax", [x2], [t("max")], axes=[1], keepdims=1),
        oh.make_node("ReduceMin", [x2], [t("min")], axes=[1], keepdims=1),
        # The range always holds 0 so that zero (e.g. after ReLU-like activations) is exact.
        oh.make_node("Max", [t("max"), zero], [t("hi")]),
        oh.make_node("Min", [t("min"), zero], [t("lo")]),
        oh.make_node("Sub", [t("hi"), t("lo")], [t("range")]),
        oh.make_node("Div", [t("range"), levels], [t("scale0")]),
        oh.make_node("Max", [t("scale0"), tiny], [t("scale")]),
        oh.make_node("Neg", [t("lo")], [t("neg_lo")]),
        oh.make_node("Div", [t("neg_lo"), t("scale")], [t("zp_raw")]),
        oh.make_node("Round", [t("zp_raw")], [t("zp")]),
        oh.make_node("Reshape", [t("scale"), flat], [t("scale_1d")]),
        oh.make_node("Reshape", [t("zp"), flat], [t("zp_1d")]),
        oh.make_node("Cast", [t("zp_1d")], [t("zp_u8")], to=TensorProto.UINT8),
        oh.make_node("QuantizeLinear", [x2, t("scale_1d"), t("zp_u8")], [t("x_q")], axis=0),
        # onnxruntime's fused int8 GEMM with the weight scales applied in its epilogue; the activation
        # scale passed is 1 because it differs per row and is applied below.
        oh.make_node(
            "MatMulIntegerToFloat",
            [t("x_q"), w_q_name, one, w_scale_name, "", w_zp],
            [t("acc_f")],
            domain="com.microsoft",
        ),
        oh.make_node("Mul", [t("zp"), col_sum], [t("offset")]),
        oh.make_node("Sub", [t("acc_f"), t("offset")], [t("centred")]),
        oh.make_node("Mul", [t("centred"), t("scale")], [y2]),
    ]
    if not rows:
        nodes += [
            oh.make_node("Shape", [x], [t("lead")], start=0, end=-1),
            oh.make_node("Concat", [t("lead"), const("width", np.array([n], np.int64))], [t("out_shape")], axis=0),
            oh.make_node("Reshape", [t("y2"), t("out_shape")], [y]),
        ]
    return nodes


def _save_with_one_data_file(proto, path: Path) -> None:
    """Graph in `path`, every tensor above 1 KB in one DATA_FILE beside it (needed past 2 GB)."""
    import onnx

    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
