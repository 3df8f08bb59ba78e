"""Loads one benchmark row's model and returns its `encode(texts) -> dense` function.

bgeserve's rows go through `Embedder`; the peers are written the way their users write them
(FlagEmbedding's BGEM3FlagModel; transformers AutoModel over length-sorted batches, pooled as the
checkpoint's sentence-transformers config says (CLS for bge-m3, the mean for all-MiniLM-L6-v2);
onnxruntime on a plain `torch.onnx.export` of that AutoModel; bge-m3-lite on that same export;
optimum-intel's OVModelForFeatureExtraction on its own export), so a ratio in the table compares bgeserve
against what people run today.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bgeserve.bench.configs import BenchConfig
from bgeserve.bench.measure import EncodeFn
from bgeserve.cache_files import build_then_rename, remove_other_keys, stamp_key
from bgeserve.models.checkpoint import model_pooling

log = logging.getLogger(__name__)


_PEER_FILE = "model.onnx"


class ConfigUnavailable(Exception):
    """A row that cannot run here for a reason found only on trying (e.g. the ONNX export fails)."""


@dataclass(frozen=True)
class RunSettings:
    """What every row shares: the model, the token limit, batch sizes, outputs, thread default, caches."""

    model_path: str
    max_length: int = 512
    batch_size: int = 32
    flag_batch_size: int = 32
    outputs: str = "dense"  # "dense" or "all" (dense + sparse + ColBERT)
    default_threads: int = 1  # torch's thread count at start-up; rows without -tN run on this many
    cache_dir: str | None = None  # where the peers' ONNX and OpenVINO exports are kept between runs
    openvino_python: str | None = None  # the interpreter that runs openvino rows (bench.configs)


def open_encoder(config: BenchConfig, settings: RunSettings) -> EncodeFn:
    """Loads `config`'s model with its thread setting and returns its encode function."""
    threads = config.threads or settings.default_threads
    if config.kind in ("cpu", "cuda", "onnx"):
        return _ours(config, settings, threads)
    import torch

    # torch's thread count is process-wide: set it for every torch row, not only those with -tN.
    torch.set_num_threads(threads)
    openers: dict[str, Callable[[BenchConfig, RunSettings, int], EncodeFn]] = {
        "flagembedding": _flagembedding,
        "transformers": _transformers,
        "onnxruntime": _onnxruntime,
        "bgelite": _bgelite,
        "openvino": _openvino,
    }
    return openers[config.kind](config, settings, threads)


def _ours(config: BenchConfig, settings: RunSettings, threads: int) -> EncodeFn:
    from bgeserve.embedder import Embedder

    extra: dict[str, Any] = {"backend": "onnx"}
    if config.kind != "onnx":
        extra = {"compile": config.compiled, "cuda_graphs": config.graphs, "query_graph": config.query_graph}
    embedder = Embedder(
        settings.model_path,
        device=config.device,
        dtype=config.dtype,
        max_length=settings.max_length,
        batch_size=settings.batch_size,
        threads=threads,
        **extra,
    )
    every = settings.outputs == "all"

    def encode(texts: list[str]) -> np.ndarray:
        out = embedder.encode(texts, return_dense=True, return_sparse=every, return_colbert_vecs=every)
        return out["dense_vecs"]

    return encode


def _flagembedding(config: BenchConfig, settings: RunSettings, threads: int) -> EncodeFn:
    from FlagEmbedding import BGEM3FlagModel

    model = BGEM3FlagModel(
        settings.model_path,
        use_fp16=config.dtype == "fp16",
        devices=config.device,
        query_max_length=settings.max_length,
        passage_max_length=settings.max_length,
    )
    every = settings.outputs == "all"

    def encode(texts: list[str]) -> np.ndarray:
        out = model.encode(
            texts,
            batch_size=settings.flag_batch_size,
            max_length=settings.max_length,
            return_dense=True,
            return_sparse=every,
            return_colbert_vecs=every,
        )
        return np.asarray(out["dense_vecs"], dtype=np.float32)

    return encode


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices longest first, cut into batches: the padding-saving order FlagEmbedding also uses."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pooled_normalized(hidden: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """Dense vectors from a padded batch's last hidden states [batch, seq, hidden] and its attention mask,
    pooled as the model is (`models.checkpoint.model_pooling`: "cls", bge-m3's, or "mean" over the real
    tokens, all-MiniLM-L6-v2's), L2-normalised: what a user of the peer writes for that model."""
    if pooling == "mean":
        weights = np.asarray(mask, dtype=np.float32)[..., None]
        vectors = (hidden.astype(np.float32) * weights).sum(1) / np.maximum(weights.sum(1), 1.0)
    else:
        vectors = hidden[:, 0].astype(np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _transformers(config: BenchConfig, settings: RunSettings, threads: int) -> EncodeFn:
    import contextlib

    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
    model = AutoModel.from_pretrained(settings.model_path, attn_implementation="sdpa", dtype=torch.float32)
    model.eval()
    if config.dtype == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    pooling = model_pooling(Path(settings.model_path))

    def precision() -> contextlib.AbstractContextManager:
        if config.dtype == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode(texts: list[str]) -> np.ndarray:
        ids = tokenizer(texts, truncation=True, max_length=settings.max_length)["input_ids"]
        lengths = [len(x) for x in ids]
        out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
        for batch in sorted_batches(lengths, settings.batch_size):
            inputs = tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                               max_length=settings.max_length, return_tensors="pt")
            with torch.inference_mode(), precision():
                hidden = model(**inputs).last_hidden_state
            out[batch] = pooled_normalized(hidden.float().numpy(), inputs["attention_mask"].numpy(), pooling)
        return out

    return encode


def _openvino(config: BenchConfig, settings: RunSettings, threads: int) -> EncodeFn:
    # Only the openvino rows' own interpreter has optimum-intel (bench.configs, scripts/openvino_venv.sh).
    from bgeserve.bench.openvino_peer import open_openvino

    return open_openvino(config, settings, threads)


def _onnxruntime(config: BenchConfig, settings: RunSettings, threads: int) -> EncodeFn:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    model_file = _onnx_export(settings, quantized=config.dtype == "int8")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    input_names = {i.name for i in session.get_inputs()}
    tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
    hidden_size = session.get_outputs()[0].shape[-1]
    pooling = model_pooling(Path(settings.model_path))

    def encode(texts: list[str]) -> np.ndarray:
        ids = tokenizer(texts, truncation=True, max_length=settings.max_length)["input_ids"]
        lengths = [len(x) for x in ids]
        out = np.zeros((len(texts), hidden_size), dtype=np.float32)
        for batch in sorted_batches(lengths, settings.batch_size):
            inputs = tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                               max_length=settings.max_length, return_tensors="np")
            feed = {k: v.astype(np.int64) for k, v in inputs.items() if k in input_names}
            (hidden,) = session.run(["last_hidden_state"], feed)
            out[batch] = pooled_normalized(hidden, inputs["attention_mask"], pooling)
        return out

    return encode


# What bge-m3-lite reads from a bge-m3 folder besides the backbone graph.
BGELITE_FILES = ("sentencepiece.bpe.model", "sparse_linear.pt", "colbert_linear.pt")


def _bgelite(config: BenchConfig, settings: RunSettings, threads: int) -> EncodeFn:
    """bge-m3-lite with its own defaults (batch 12, 16384-token budget) on the plain export, or on its
    int8 quantisation: the way its README runs a custom backbone (`model_path`)."""
    from unittest import mock

    from bge_m3_lite import hub
    from bge_m3_lite.embedder import BGEM3Embedder

    model_dir = Path(settings.model_path)
    hidden = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("hidden_size")
    if hidden != 1024:
        raise ConfigUnavailable(f"bge-m3-lite runs bge-m3's shape only (hidden size 1024; this model: {hidden})")
    files = {name: model_dir / name for name in BGELITE_FILES}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise ConfigUnavailable(f"bge-m3-lite needs {', '.join(missing)} in the model folder")
    backbone = _token_embeddings_graph(_onnx_export(settings, quantized=config.dtype == "int8"))

    def local_files(remotes: tuple, *_args: object, **_kwargs: object) -> dict[str, Path]:
        return {remote.name: files[remote.name] for remote in remotes}

    # bge-m3-lite checks BAAI's published digests and downloads on a mismatch; this row must run on the
    # checkpoint being measured, so its file lookup is pointed at that folder while it loads.
    with mock.patch.object(hub, "ensure_files", local_files):
        embedder = BGEM3Embedder(model_path=backbone, num_threads=threads, max_length=settings.max_length,
                                 quiet=True)
    every = settings.outputs == "all"

    def encode(texts: list[str]) -> np.ndarray:
        out = embedder.encode(texts, return_dense=True, return_sparse=every, return_colbert_vecs=every)
        return np.asarray(out["dense_vecs"], dtype=np.float32)

    return encode


def _token_embeddings_graph(model_file: Path) -> Path:
    """`model_file` with its output renamed `token_embeddings` (bge-m3-lite's name); the weights stay shared."""
    import onnx

    out = model_file.with_name(f"{model_file.stem}.token-embeddings.onnx")
    if out.exists():
        return out
    model = onnx.load(str(model_file), load_external_data=False)
    source = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Identity", [source], ["token_embeddings"]))
    model.graph.output[0].name = "token_embeddings"
    partial = out.with_name(out.name + ".partial")
    onnx.save(model, str(partial))  # next to the original, so its external-data paths still resolve
    os.replace(partial, out)
    return out


def _onnx_export(settings: RunSettings, quantized: bool) -> Path:
    """A plain `torch.onnx.export` of AutoModel (and its dynamic int8 quantisation), cached by model file."""
    import torch
    import transformers

    model_dir = Path(settings.model_path)
    folder = export_folder(settings, "onnx-peer", [torch.__version__, transformers.__version__])
    fp32_dir = build_then_rename(folder / "fp32", lambda out: _export_fp32(model_dir, out / _PEER_FILE), _PEER_FILE)
    fp32_file = fp32_dir / _PEER_FILE
    if not quantized:
        return fp32_file
    return build_then_rename(folder / "int8", lambda out: _quantize_dynamic(fp32_file, out), _PEER_FILE) / _PEER_FILE


def _quantize_dynamic(fp32_file: Path, out_dir: Path) -> None:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32_file), str(out_dir / _PEER_FILE), weight_type=QuantType.QInt8,
                         use_external_data_format=True)
    except Exception as exc:  # noqa: BLE001 - any failure of the peer's tool is a reason to skip it
        raise ConfigUnavailable(f"onnxruntime int8 quantization failed: {type(exc).__name__}: {exc}") from exc


def export_folder(settings: RunSettings, exporter: str, versions: list[str]) -> Path:
    """Where `exporter`'s export of the model lives: keyed by the model's path and weight files and the
    exporting libraries' versions, so a changed checkpoint or library gets a fresh export."""
    model_dir = Path(settings.model_path)
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".bin", ".safetensors"))
    key = stamp_key(weights, versions, length=16)
    base = Path(settings.cache_dir) if settings.cache_dir else model_dir / ".bench-cache"
    # Named after this model directory, so that its exports under other keys (older weights or libraries,
    # GBs for bge-m3) can be removed without touching other models' in a shared cache.
    place = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:8]
    folder = base / exporter / f"{model_dir.name}-{place}-{key}"
    remove_other_keys(folder, key)
    return folder


def _export_fp32(model_dir: Path, out_file: Path) -> None:
    import torch
    from transformers import AutoModel

    log.info("exporting %s to ONNX (one time) into %s", model_dir, out_file.parent)
    class LastHiddenState(torch.nn.Module):
        # Keyword call: AutoModel's positional order differs between transformers versions.
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model = LastHiddenState(
        AutoModel.from_pretrained(str(model_dir), attn_implementation="eager", dtype=torch.float32)
    ).eval()
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]], dtype=torch.long)
    mask = (ids != 1).long()
    axes = {0: "batch", 1: "sequence"}
    try:
        with torch.inference_mode():
            torch.onnx.export(
                model,
                (ids, mask),
                str(out_file),
                input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
                opset_version=17,
                dynamo=False,
            )
    except Exception as exc:  # noqa: BLE001 - the peer is "a plain export": if that fails, it has no row
        reason = f"torch.onnx.export of AutoModel failed: {type(exc).__name__}: {exc}"
        raise ConfigUnavailable(reason) from exc
