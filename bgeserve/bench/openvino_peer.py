"""The openvino peer: the checkpoint through optimum-intel's OVModelForFeatureExtraction, as its users run it.

Imported only under the interpreter that `scripts/openvino_venv.sh` makes (optimum-intel pins transformers
below bgeserve's dev pin). The checkpoint is exported once with `from_pretrained(path, export=True)` and
cached; dense vectors are pooled as the checkpoint says (bge-m3: CLS) and L2-normalised, over
length-sorted batches, as in the transformers peer. int8 is NNCF's full quantisation of weights and
activations (OVQuantizer with OVQuantizationConfig), calibrated on texts of the bundled corpus.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bgeserve.bench.configs import BenchConfig
from bgeserve.bench.runners import ConfigUnavailable, RunSettings, export_folder, pooled_normalized, sorted_batches
from bgeserve.cache_files import build_then_rename
from bgeserve.models.checkpoint import model_pooling

# OpenVINO's CPU plugin runs bf16 by default where the CPU has AMX or AVX512-BF16, so fp32 is asked for
# explicitly. int8 keeps its non-quantised ops in f32 too, so the row measures int8 and nothing else.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
CALIBRATION_TEXTS = 64  # spread over bgeserve/data/mixed.txt: every language of the bench's default corpus
CALIBRATION_SOURCE = "bgeserve/data/mixed.txt"
_COMPLETE = ".complete"


class OpenVinoEncoder:
    """`encode(texts) -> dense` over an OVModelForFeatureExtraction; `notes` say what actually ran."""

    def __init__(self, model: Any, tokenizer: Any, settings: RunSettings, notes: list[str]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.notes = notes
        self.pooling = model_pooling(Path(settings.model_path))

    def __call__(self, texts: list[str]) -> np.ndarray:
        limit = self.settings.max_length
        ids = self.tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for batch in sorted_batches([len(x) for x in ids], self.settings.batch_size):
            inputs = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=limit,
                                    return_tensors="np")
            hidden = np.asarray(self.model(**inputs).last_hidden_state)
            out[batch] = pooled_normalized(hidden, inputs["attention_mask"], self.pooling)
        return out


def open_openvino(config: BenchConfig, settings: RunSettings, threads: int) -> OpenVinoEncoder:
    """Loads the cached export (made on first use) with the row's precision and threads, compiled for CPU."""
    from optimum.intel import OVModelForFeatureExtraction
    from transformers import AutoTokenizer

    folder = exported_model(settings, quantized=config.dtype == "int8")
    ov_config = {
        "INFERENCE_PRECISION_HINT": PRECISION_HINTS[config.dtype],
        "INFERENCE_NUM_THREADS": str(threads),
        "NUM_STREAMS": "1",
        "PERFORMANCE_HINT": "LATENCY",
    }
    model = OVModelForFeatureExtraction.from_pretrained(folder, ov_config=ov_config, device="CPU")
    model.compile()
    tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
    return OpenVinoEncoder(model, tokenizer, settings, _notes(config, model.request))


def _notes(config: BenchConfig, compiled: Any) -> list[str]:
    """The versions and the precision OpenVINO compiled for (a bf16 hint falls back to f32 without bf16)."""
    ran = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("openvino", "optimum-intel"))
    notes = [f"{versions}; inference precision {ran}"]
    if config.dtype == "int8":
        notes.append(f"int8 weights and activations (OVQuantizer, OVQuantizationConfig, {CALIBRATION_TEXTS} "
                     f"calibration texts of {CALIBRATION_SOURCE}); other ops f32")
    return notes


def exported_model(settings: RunSettings, quantized: bool) -> Path:
    """The folder of the OpenVINO IR (fp32, or its int8 quantisation), exported once into the bench's cache."""
    import nncf
    import openvino
    import torch
    import transformers

    versions = [torch.__version__, transformers.__version__, openvino.__version__, nncf.__version__,
                importlib.metadata.version("optimum-intel")]
    folder = export_folder(settings, "openvino-peer", versions)
    fp32_dir = _make(folder / "fp32", lambda out: _export(Path(settings.model_path), out), "export")
    if not quantized:
        return fp32_dir
    return _make(folder / "int8", lambda out: _quantize(fp32_dir, out, settings), "int8 quantization")


def _make(target: Path, write: Callable[[Path], None], what: str) -> Path:
    """`target`, written once by `write` (built aside and renamed in); a failure of optimum-intel's tools
    skips the row."""

    def build(staging: Path) -> None:
        try:
            write(staging)
        except Exception as exc:  # noqa: BLE001 - the peer is optimum-intel's own path: if that fails, no row
            raise ConfigUnavailable(f"optimum-intel {what} failed: {type(exc).__name__}: {exc}") from exc
        (staging / _COMPLETE).touch()

    return build_then_rename(target, build, _COMPLETE)


def _export(model_dir: Path, out_dir: Path) -> None:
    from optimum.intel import OVModelForFeatureExtraction

    model = OVModelForFeatureExtraction.from_pretrained(str(model_dir), export=True, compile=False)
    model.save_pretrained(out_dir)


def _quantize(fp32_dir: Path, out_dir: Path, settings: RunSettings) -> None:
    import nncf
    from optimum.intel import OVConfig, OVModelForFeatureExtraction, OVQuantizationConfig, OVQuantizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
    samples = [dict(tokenizer(text, truncation=True, max_length=settings.max_length, return_tensors="np"))
               for text in calibration_texts()]
    model = OVModelForFeatureExtraction.from_pretrained(fp32_dir, compile=False)
    quantization = OVQuantizationConfig(num_samples=len(samples))
    OVQuantizer.from_pretrained(model).quantize(
        calibration_dataset=nncf.Dataset(samples), ov_config=OVConfig(quantization_config=quantization),
        save_directory=out_dir,
    )


def calibration_texts(count: int = CALIBRATION_TEXTS) -> list[str]:
    """`count` texts spread over the bundled corpus (the bench's default corpus)."""
    from importlib import resources

    from bgeserve.bench.offline import spread

    text = resources.files("bgeserve").joinpath("data", "mixed.txt").read_text(encoding="utf-8")
    return spread([line for line in text.splitlines() if line.strip()], count)
