"""The cache of ONNX exports: one directory per model, precision and key, built aside and renamed in.

Exports are cached in `<model dir>/bgeserve-onnx/` when that directory is writable, else in a cache
directory, under a key made of each source file's name, size and mtime (no hashing of gigabytes of
weights on every start), the exporter version, the torch version and the opset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from bgeserve.cache_files import build_then_rename, model_cache_entry, remove_other_keys, stamp_key
from bgeserve.models.checkpoint import Checkpoint
from bgeserve.runtime import onnx_export
from bgeserve.runtime.cpu_features import cpu_has_vnni
from bgeserve.runtime.onnx_export import EXPORTER_VERSION, MODEL_FILE, OPSET
from bgeserve.runtime.onnx_int8 import INT8_REWRITE, quantize_int8

log = logging.getLogger(__name__)

CACHE_SUBDIR = "bgeserve-onnx"
ONNX_DTYPES = ("fp32", "int8")


def default_cache_dir() -> Path:
    """`~/.cache/bgeserve/onnx`, used when the model directory is read-only and no cache dir is given."""
    return Path.home() / ".cache" / "bgeserve" / "onnx"


def _source_files(checkpoint: Checkpoint) -> list[Path]:
    """Every file whose change changes the exported graph."""
    files = [checkpoint.weights_file, checkpoint.path / "config.json"]
    files += [f for f in (checkpoint.sparse_head, checkpoint.colbert_head) if f is not None]
    return files


def cache_key(checkpoint: Checkpoint, rewrite: str = "") -> str:
    """Key of an export: source files' name + size + mtime, exporter and torch versions, opset, and the
    version of the rewrite made after export (int8), if any."""
    parts = (EXPORTER_VERSION, torch.__version__, str(OPSET)) + ((rewrite,) if rewrite else ())
    return stamp_key(_source_files(checkpoint), parts)


def cache_location(checkpoint: Checkpoint, dtype: str, cache_dir: Path | None = None, key: str | None = None) -> Path:
    """Directory holding the `dtype` export: an explicit `cache_dir` wins, then the model directory when
    writable (and not inside an installed package), then `default_cache_dir()`. `key`: cache_key(checkpoint)
    when the caller has it already."""
    name = f"{key or cache_key(checkpoint)}-{dtype}"
    return model_cache_entry(checkpoint.path, checkpoint.name, CACHE_SUBDIR, default_cache_dir(), name, cache_dir)


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
    key = cache_key(checkpoint, INT8_REWRITE if dtype == "int8" else "")
    target = cache_location(checkpoint, variant, cache_dir, key)
    if (target / MODEL_FILE).is_file():
        log.info("reusing ONNX export %s", target)
        return target / MODEL_FILE
    if dtype == "fp32":
        return _publish(target, lambda tmp: onnx_export.export_onnx(checkpoint, tmp / MODEL_FILE), key)
    source = ensure_onnx_model(checkpoint, "fp32", cache_dir)
    log.info("quantising %s to int8 (%s weights) ...", checkpoint.name, "s8" if signed else "u8")
    return _publish(target, lambda tmp: quantize_int8(source, tmp / MODEL_FILE, signed_weights=signed), key)


def _publish(target: Path, build: Callable[[Path], object], key: str) -> Path:
    """Builds the export aside and renames it in (readers never see half an export; when two replicas
    export at once the first rename wins), then removes this model's exports under older keys."""
    build_then_rename(target, build, MODEL_FILE)
    remove_other_keys(target, key)
    return target / MODEL_FILE
