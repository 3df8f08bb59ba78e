"""Exports our EmbeddingModel (encoder + every head) to one ONNX graph.

The graph runs packed batches (no projection FLOP on padding), like the torch backend. Inputs, all
int64 with dynamic axes (see models.packed.PackedBatch for how they are made):

- `input_ids`, `position_ids` [tokens]: every sequence's ids back to back, and their position ids
- `gather_index`, `attention_mask` [batch, seq]: the padded layout attention runs in
- `scatter_index` [tokens]: each token's place in that layout
- `rows` [rows]: the tokens the last layer computes past its attention, all of them (0, 1, ..., tokens - 1)
  unless only the CLS rows are read (`runtime.packed_outputs.cls_rows_suffice`)

Outputs, one row per entry of `rows`:

- `last_hidden_state` [rows, hidden]
- `token_weights` [rows]: relu(sparse_linear(H)), only when the checkpoint has the sparse head
- `colbert` [rows, dim]: colbert_linear(H) L2-normalised, only with the ColBERT head (CLS rows included)

Pooling, lexical weights and splitting per sequence happen on the host (runtime.packed_outputs), as for
the torch backend. The int8 rewrite of the graph is in `runtime.onnx_int8`, the cache of exports in
`runtime.onnx_cache`.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bgeserve.models.checkpoint import Checkpoint
from bgeserve.models.config import EncoderConfig
from bgeserve.models.embedding_model import EmbeddingModel
from bgeserve.models.encoder import packed_positions
from bgeserve.models.heads import colbert_vectors, token_weights
from bgeserve.models.packed import PackedBatch, gathered_attention

log = logging.getLogger(__name__)

# Bump whenever the exported graph changes (outputs, ops, quantisation recipe): old caches are ignored.
EXPORTER_VERSION = "bgeserve-onnx-7-last-layer-rows"
OPSET = 17
INPUT_NAMES = ("input_ids", "position_ids", "gather_index", "attention_mask", "scatter_index", "rows")
# Exported graph outputs; the sparse and ColBERT ones only when the checkpoint has those heads.
HIDDEN, TOKEN_WEIGHTS, COLBERT = "last_hidden_state", "token_weights", "colbert"
MODEL_FILE = "model.onnx"
# Weights always go to one side file: the ONNX protobuf itself cannot exceed 2 GB (bge-m3 is 2.27 GB).
DATA_FILE = "model.onnx.data"


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
        rows: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        # The key mask is made once here, not once per layer.
        key_padding = attention_mask.to(torch.int32)
        attend = partial(
            multi_head_attention,
            gather_index=gather_index,
            key_padding=key_padding,
            scatter_index=scatter_index,
            heads=self.model.encoder.cfg.num_heads,
            hidden=self.model.encoder.cfg.hidden_size,
        )
        hidden = self.model.encoder.encode_tokens(input_ids, position_ids, attend, rows)
        outputs = [hidden]
        if self.model.sparse_linear is not None:
            outputs.append(token_weights(hidden, self.model.sparse_linear))
        if self.model.colbert_linear is not None:
            outputs.append(colbert_vectors(hidden, self.model.colbert_linear))
        return tuple(outputs)


class _MultiHeadAttention(torch.autograd.Function):
    """Masked self-attention over [B, S, heads * head_dim] q, k, v that exports as onnxruntime's fused
    com.microsoft MultiHeadAttention: one node per layer where SDPA traced to ~25 (transposes, shape
    arithmetic, two matrix products, mask, softmax): int8 batches of short texts run 3-5% faster (measured in
    BENCHMARKS.md). Tracing runs `forward`, the same attention in torch."""

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
    qkv: torch.Tensor,
    gather_index: torch.Tensor,
    key_padding: torch.Tensor,
    scatter_index: torch.Tensor,
    heads: int,
    hidden: int,
) -> torch.Tensor:
    """models.packed.gathered_attention around onnxruntime's fused attention. `key_padding` is the [B, S]
    int32 mask (1 = a token). `heads` and `hidden` come from the config, not from traced shapes: the exporter
    takes an attribute or a constant split only from plain Python values."""

    def fused(padded: torch.Tensor) -> torch.Tensor:
        # One Split of the [B, S, 3 * hidden] rows into q, k, v, by sizes known at export (no shape
        # arithmetic in the graph), and no Squeeze or Reshape per tensor.
        return _MultiHeadAttention.apply(*padded.split([hidden] * 3, dim=-1), key_padding, heads)

    return gathered_attention(qkv, gather_index, scatter_index, fused)


def _fill_attention_bias_slot(graph) -> None:  # noqa: ANN001 - an onnx GraphProto
    """MultiHeadAttention(q, k, v, mask) as traced -> (q, k, v, "", mask): the mask is its fifth input."""
    for node in graph.node:
        if node.op_type == "MultiHeadAttention" and len(node.input) == 4:
            node.input.insert(3, "")


def packed_inputs(batch: PackedBatch, cfg: EncoderConfig, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The graph's inputs for a packed batch (CPU tensors, int64); `rows` default: every token."""
    return {
        "input_ids": batch.ids,
        "position_ids": packed_positions(batch, cfg),
        "gather_index": batch.gather_index(),
        "attention_mask": batch.mask(),
        "scatter_index": batch.scatter_index(),
        "rows": torch.arange(len(batch.ids)) if rows is None else rows,
    }


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
    axes = {name: {0: "tokens"} for name in ("input_ids", "position_ids", "scatter_index")}
    axes |= {name: {0: "rows"} for name in ("rows", *names)}
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
    save_with_one_data_file(proto, path)
    del proto
    shutil.rmtree(raw_dir)
    return path


def save_with_one_data_file(proto, path: Path) -> None:
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
