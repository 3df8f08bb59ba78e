"""The torch runtime: pads a batch, runs the encoder and heads, returns numpy results per item."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from bgeserve.core import BackendOptions, OutputRequest
from bgeserve.data import sample_texts
from bgeserve.models.checkpoint import Checkpoint
from bgeserve.models.embedding_model import EmbeddingModel
from bgeserve.models.encoder import packed_positions
from bgeserve.models.heads import colbert_vectors, token_weights
from bgeserve.models.packed import PackedBatch
from bgeserve.runtime.cpu_features import cpu_has_native_bf16, exact_int8_products
from bgeserve.runtime.cpu_linear import pack_encoder_linears
from bgeserve.runtime.cuda_graphs import GraphedForward
from bgeserve.runtime.devices import DTYPES, resolve_device, resolve_dtype
from bgeserve.runtime.int8 import input_maxima, quantize_encoder_int8
from bgeserve.runtime.int8_passes import Int8Kernels, LayerShape
from bgeserve.runtime.packed_outputs import PackedBackend, PackedResult, cls_rows_suffice
from bgeserve.runtime.query_graph import QUERY_GRAPH_DTYPES, QueryGraph
from bgeserve.runtime.token_int8 import quantize_encoder_token_int8

log = logging.getLogger(__name__)

COMPILE_LENGTH_BUCKET = 32
CALIBRATION_TEXTS = 16


def calibration_texts() -> list[str]:
    """The lines int8 calibrates its channel scales on: a few of the packaged multilingual corpus, spread over it."""
    lines = sample_texts()
    return lines[:: max(1, len(lines) // CALIBRATION_TEXTS)][:CALIBRATION_TEXTS]


class TorchBackend(PackedBackend):
    """One model replica on one device."""

    def __init__(self, checkpoint: Checkpoint, device: str = "cpu", options: BackendOptions | None = None) -> None:
        """`options` default: exact fp32, eager. Threads are set per process (runtime.factory), not here."""
        super().__init__(checkpoint)
        options = options or BackendOptions(dtype="fp32")
        compile, cuda_graphs = options.compile, options.cuda_graphs
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        model = EmbeddingModel(checkpoint)
        self.int8_recipe: str | None = None
        if self.dtype == "int8":
            # The encoder layers' projections in int8; embeddings, norms and heads stay fp32.
            self.int8_recipe = self._quantize(model, compile)
        model = model.to(self.device).eval()
        if self.dtype in ("fp16", "bf16"):
            model.encoder.set_compute_dtype(DTYPES[self.dtype])
        # Built before the eager weights are packed: the graph freezes (and packs) the plain ones itself.
        self._query_graph = self._load_query_graph(model) if options.query_graph else None
        if self.device == "cpu" and self.dtype in ("fp32", "bf16") and not compile:
            pack_encoder_linears(model.encoder, checkpoint.config.hidden_act)
        self.model = model
        # Compiled graphs are shape-specialised: lengths are padded to buckets so a few graphs serve all inputs.
        self._compiled = compile
        self._forward_module = torch.compile(model, dynamic=True) if compile else model
        self._graphs: GraphedForward | None = None
        if compile:
            self._warm_up()
        # Small batches on CUDA replay captured graphs (one launch instead of ~15 per layer).
        if cuda_graphs and self.device.startswith("cuda"):
            self._graphs = GraphedForward(self._forward_module, self.device, self._pad_id)
        elif cuda_graphs:
            log.info("CUDA graphs apply to CUDA devices only: not used on %s", self.device)
        extras = ", compiled" * compile + ", CUDA graphs" * (self._graphs is not None)
        extras += ", query graph" * (self._query_graph is not None)
        extras += f"; int8: {self.int8_recipe}" if self.int8_recipe else ""
        log.info("loaded %s on %s (%s%s)", checkpoint.name, self.device, self.dtype, extras)

    def _quantize(self, model: EmbeddingModel, compile: bool) -> str:
        """Per-token u8 x s8 products on oneDNN where the CPU makes them exact (VNNI, AMX), else the
        smoothed per-tensor kernel torch has everywhere (and `compile` traces). Returns which, for the log."""
        if self.device == "cpu" and not compile and exact_int8_products():
            attention = "bf16" if cpu_has_native_bf16() else "fp32"
            kernels = Int8Kernels.build(LayerShape.of(self.checkpoint.config, DTYPES[attention]))
            maxima = input_maxima(model, self._calibration_batches())
            one_graph = quantize_encoder_token_int8(model.encoder, kernels, DTYPES[attention],
                                                    self.checkpoint.config.hidden_act, maxima)
            passes = ("compiled into one graph a layer after attention" if one_graph
                      else "fused quantisation" if kernels.compiled else "eager quantisation")
            return f"per-token u8 x s8 on oneDNN over smoothed channels, {passes}, {attention} attention"
        quantize_encoder_int8(model, self._calibration_batches())
        return "SmoothQuant-scaled rows over torch's dynamic int8 kernel"

    def _load_query_graph(self, model: EmbeddingModel) -> QueryGraph | None:
        """The compiled lone-text graph where it applies (the CPU, fp32 or bf16, eager); None elsewhere."""
        if self.device != "cpu" or self.dtype not in QUERY_GRAPH_DTYPES:
            log.info("the query graph applies to fp32 and bf16 on the CPU only: not used for %s on %s",
                     self.dtype, self.device)
            return None
        return QueryGraph.load(self.checkpoint, model.encoder, self.dtype)

    def _calibration_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`calibration_texts()`, one text per batch (no padding rows)."""
        ids = self.checkpoint.tokenizer.encode(calibration_texts(), max_length=min(128, self.checkpoint.max_length)).ids
        return [(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)) for seq in ids]

    def _warm_up(self) -> None:
        for length in (8, 64):
            self.run([[self._pad_id + 1] * length] * 2, OutputRequest())

    def _forward(self, batch: list[list[int]], want: OutputRequest) -> tuple[PackedBatch, PackedResult]:
        packed = PackedBatch.from_sequences(batch, self.device)
        graphed = None
        if self._graphs is not None and self._graphs.fits(len(batch), packed.max_len):
            graphed = self._graphs(packed.pad(packed.ids, self._pad_id), packed.mask())
        if graphed is not None:
            # Indexing copies the real rows out of the graph's output buffer before anything replays it.
            hidden = graphed[packed.segment, packed.offset]
        elif self._query_graph is not None and len(batch) == 1 and self._query_graph.fits(packed.max_len):
            return packed, self._graphed_text(packed, want)
        elif self._compiled:
            # Compiled graphs want few distinct shapes, so they keep the padded, length-bucketed layout.
            hidden = self._padded_forward(packed)
        else:
            # Eager runs pack the batch and spend nothing on padding, nor on rows no output reads.
            if cls_rows_suffice(want, self.checkpoint.pooling):
                return packed, PackedResult(self.model.forward_packed(packed, packed.starts), cls_only=True)
            hidden = self.model.forward_packed(packed)
        return packed, self._heads(hidden, want)

    def _graphed_text(self, packed: PackedBatch, want: OutputRequest) -> PackedResult:
        """One text through the query graph: the CLS row alone where it suffices, else every row."""
        assert self._query_graph is not None
        encoder = self.model.encoder
        hidden = encoder.embeddings.embed(packed.ids, packed_positions(packed, encoder.cfg))
        if cls_rows_suffice(want, self.checkpoint.pooling):
            return PackedResult(self._query_graph(hidden, packed.starts), cls_only=True)
        return self._heads(self._query_graph(hidden, torch.arange(packed.max_len)), want)

    def _padded_forward(self, packed: PackedBatch) -> torch.Tensor:
        """The real rows of the padded, bucketed forward pass, in packed order."""
        extra = -(-packed.max_len // COMPILE_LENGTH_BUCKET) * COMPILE_LENGTH_BUCKET - packed.max_len
        ids = F.pad(packed.pad(packed.ids, self._pad_id), (0, extra), value=self._pad_id)
        mask = F.pad(packed.mask(), (0, extra))
        return self._forward_module(ids, mask)[packed.segment, packed.offset]

    def _heads(self, hidden: torch.Tensor, want: OutputRequest) -> PackedResult:
        """The sparse and ColBERT heads on the packed hidden states [T, hidden]."""
        result = PackedResult(hidden)
        if want.sparse:
            assert self.model.sparse_linear is not None  # capabilities.require checked it
            result.token_weights = token_weights(hidden, self.model.sparse_linear)
        if want.colbert:
            assert self.model.colbert_linear is not None
            result.colbert = colbert_vectors(hidden, self.model.colbert_linear)
        return result
