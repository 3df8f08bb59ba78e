"""A lone text's pass through the encoder layers as one ahead-of-time compiled graph, for the CPU.

A lone short text (a search query) is where eager torch's per-op dispatch shows: bge-m3 in bf16 on a
14-token query spends ~4.5 of its ~38 ms outside the 96 matrix products, in ~500 small ops a few
microseconds each. AOTInductor compiles the 24 layers into one C++ graph with the elementwise ops fused
(each residual add, LayerNorm and dtype conversion one kernel) and the weights frozen and pre-packed
for oneDNN, so the products are the same kernels and almost nothing else is left.

The graph takes one text's embedded tokens [T, hidden] (fp32) and the rows the last layer computes
past its attention (the CLS row for a CLS-pooled dense vector, every row for sparse and ColBERT), and
returns their last hidden states [R, hidden] in fp32; T and R are dynamic (a 1-token text runs eagerly).
It is compiled once (bge-m3: ~1 min on 2 cores, ~0.6 GB of bf16 weights in the package;
`runtime.query_graph_export`) and cached on disk like the ONNX exports: one package per model
(`graph_key`) and variant (`graph_variant`: dtype, CPU, thread count). Batches of several texts stay on
the eager packed path, whose per-op cost is small beside their products.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from bgeserve.cache_files import build_then_rename, exclusive_build, model_cache_entry, remove_other_keys, stamp_key
from bgeserve.errors import CompileFailed
from bgeserve.models import encoder as encoder_module
from bgeserve.models import packed as packed_module
from bgeserve.models.checkpoint import Checkpoint
from bgeserve.models.encoder import TransformerEncoder
from bgeserve.runtime import query_graph_export
from bgeserve.runtime.cpu_info import cpu_flags
from bgeserve.runtime.query_graph_export import LayerStack, compile_package

log = logging.getLogger(__name__)

QUERY_GRAPH_DTYPES = ("fp32", "bf16")
CACHE_SUBDIR = "bgeserve-aoti"
PACKAGE_FILE = "model.pt2"
# The code a package freezes: the layers, their attention and the export itself.
_GRAPH_SOURCES = (encoder_module, packed_module, query_graph_export)


def default_cache_dir() -> Path:
    """`~/.cache/bgeserve/aoti`, used when the model directory is read-only."""
    return Path.home() / ".cache" / "bgeserve" / "aoti"


def graph_key(checkpoint: Checkpoint) -> str:
    """What makes a package outdated: the weights' and config's name, size and mtime, the model's token
    limit, torch's version and the source of the code the graph freezes. A newer key replaces the older
    packages of the same variant."""
    code = hashlib.sha256(b"".join(Path(str(m.__file__)).read_bytes() for m in _GRAPH_SOURCES)).hexdigest()
    files = [checkpoint.weights_file, checkpoint.path / "config.json"]
    return stamp_key(files, (torch.__version__, str(checkpoint.max_length), code))


def graph_variant(dtype: str, flags: frozenset[str] | None = None, threads: int | None = None) -> str:
    """Which of a model's packages a process can load: its dtype, the CPU's instruction flags (all of them:
    Inductor builds for this CPU, and a package built for another may not run here) and the intra-op
    thread count it was compiled under (`flags`, `threads`: default this CPU's and torch's). Packages of
    other variants, another machine's in a shared model directory, are left in place."""
    flags = cpu_flags() if flags is None else flags
    cpu = hashlib.sha256(",".join(sorted(flags)).encode()).hexdigest()[:10]
    return f"{dtype}-cpu{cpu}-t{torch.get_num_threads() if threads is None else threads}"


def graph_location(checkpoint: Checkpoint, key: str, variant: str) -> Path:
    """Directory of one package: beside the model when writable, else under `default_cache_dir()`."""
    return model_cache_entry(checkpoint.path, checkpoint.name, CACHE_SUBDIR, default_cache_dir(), f"{key}-{variant}")


class QueryGraph:
    """The compiled layer stack of one model and dtype: `graph(hidden, rows)` as LayerStack computes it."""

    def __init__(self, runner: Any, max_tokens: int, path: Path) -> None:
        self._runner = runner
        self.max_tokens = max_tokens
        self.path = path

    @classmethod
    def load(cls, checkpoint: Checkpoint, encoder: TransformerEncoder, dtype: str) -> QueryGraph:
        """The cached graph for `encoder` (its layers already in `dtype`), compiled first when absent."""
        if dtype not in QUERY_GRAPH_DTYPES:
            raise ValueError(f"no query graph for dtype {dtype!r}: use {' or '.join(QUERY_GRAPH_DTYPES)}")
        key = graph_key(checkpoint)
        target = graph_location(checkpoint, key, graph_variant(dtype))
        with exclusive_build(target):  # replicas starting together compile once, not once each
            if (target / PACKAGE_FILE).is_file():
                log.info("reusing the compiled query graph %s", target)
            else:
                _compile(checkpoint, encoder, dtype, target)
                remove_other_keys(target, key)
        try:
            runner = torch._inductor.aoti_load_package(str(target / PACKAGE_FILE))
        except Exception as exc:  # noqa: BLE001
            raise CompileFailed(f"--query-graph: the cached graph {target} does not load ({_first_line(exc)}); "
                                "delete that directory to compile it again") from exc
        return cls(runner, checkpoint.max_length, target)

    def fits(self, tokens: int) -> bool:
        """Whether a text of `tokens` tokens is in the range the graph was compiled for."""
        return 2 <= tokens <= self.max_tokens

    def __call__(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Embedded tokens [T, hidden] (fp32) and row indices [R] -> those rows' last hidden states, fp32."""
        return self._runner(hidden, rows)


def _compile(checkpoint: Checkpoint, encoder: TransformerEncoder, dtype: str, target: Path) -> None:
    log.info("compiling %s's query graph (%s, once: cached in %s) ...", checkpoint.name, dtype, target)
    started = time.perf_counter()
    stack = LayerStack(encoder)
    cfg = checkpoint.config
    try:
        build_then_rename(target, lambda tmp: compile_package(stack, cfg.hidden_size, checkpoint.max_length,
                                                              tmp / PACKAGE_FILE), PACKAGE_FILE)
    except Exception as exc:  # noqa: BLE001 - Inductor's many failure types (no compiler, ...), reported as one
        raise CompileFailed(f"--query-graph: compiling the graph failed on this machine ({_first_line(exc)}); "
                            "it needs a working C++ compiler (g++) and, for bge-m3, ~5 GB of memory "
                            "while it compiles; or serve without --query-graph") from exc
    log.info("compiled the query graph in %.0f s", time.perf_counter() - started)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
