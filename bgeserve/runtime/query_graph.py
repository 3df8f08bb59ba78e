"""A lone text's pass through the encoder layers as one ahead-of-time compiled graph, for the CPU.

A lone short text (a search query) is where eager torch's per-op dispatch shows: bge-m3 in bf16 on a
14-token query spends ~4.5 of its ~38 ms outside the 96 matrix products, in ~500 small ops a few
microseconds each. AOTInductor compiles the 24 layers into one C++ graph with the elementwise ops fused
(each residual add, LayerNorm and dtype conversion one kernel) and the weights frozen and pre-packed
for oneDNN, so the products are the same kernels and almost nothing else is left.

The graph takes one text's embedded tokens [T, hidden] (fp32) and the rows the last layer computes
past its attention (the CLS row for a CLS-pooled dense vector, every row for sparse and ColBERT), and
returns their last hidden states [R, hidden] in fp32; T and R are dynamic. It is compiled once (bge-m3:
~1 min on 2 cores, ~0.6 GB of bf16 weights in the package) and cached on disk like the ONNX exports,
keyed by the weights' files, torch's version, the dtype and the CPU's instruction flags (a graph built
for AVX512 must never load on an AVX2 CPU). Batches of several texts stay on the eager packed path,
whose per-op cost is small beside their products.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bgeserve.cache_files import build_then_rename, model_cache_entry, remove_other_keys, stamp_key
from bgeserve.errors import CompileFailed
from bgeserve.models.checkpoint import Checkpoint
from bgeserve.models.encoder import TransformerEncoder, run_layers
from bgeserve.models.packed import sequence_attention
from bgeserve.runtime.cpu_info import speed_flags

log = logging.getLogger(__name__)

QUERY_GRAPH_DTYPES = ("fp32", "bf16")
CACHE_SUBDIR = "bgeserve-aoti"
PACKAGE_FILE = "model.pt2"
# Part of the cache key: a change to what the graph computes, or to its inputs, must change it.
GRAPH_VERSION = "layers-rows-1"
# The example sizes the graph is traced at: above 1, which export would otherwise specialise on.
_EXAMPLE_TOKENS, _EXAMPLE_ROWS = 16, 2


def default_cache_dir() -> Path:
    """`~/.cache/bgeserve/aoti`, used when the model directory is read-only."""
    return Path.home() / ".cache" / "bgeserve" / "aoti"


class LayerStack(nn.Module):
    """The encoder's layers on one whole sequence: (embedded tokens [T, hidden], rows [R]) -> [R, hidden].
    Holds the layers alone, so that the graph's constants are theirs (not the 1 GB embedding table)."""

    def __init__(self, encoder: TransformerEncoder) -> None:
        super().__init__()
        self.layers = encoder.layers

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return run_layers(self.layers, hidden, sequence_attention, rows)


def graph_key(checkpoint: Checkpoint, dtype: str, flags: list[str] | None = None) -> str:
    """Key of a compiled graph: the weights' and config's name, size and mtime, the graph's version,
    torch's version, the dtype and the CPU's instruction flags (`flags`, default this CPU's)."""
    cpu = ",".join(speed_flags() if flags is None else flags)
    files = [checkpoint.weights_file, checkpoint.path / "config.json"]
    return stamp_key(files, (GRAPH_VERSION, torch.__version__, dtype, cpu))


def graph_location(checkpoint: Checkpoint, dtype: str, key: str) -> Path:
    """Directory of the `dtype` graph: beside the model when writable, else under `default_cache_dir()`."""
    return model_cache_entry(checkpoint.path, checkpoint.name, CACHE_SUBDIR, default_cache_dir(), f"{key}-{dtype}")


def compile_package(stack: LayerStack, hidden_size: int, max_tokens: int, package: Path) -> None:
    """Exports `stack` with dynamic token and row counts (up to `max_tokens`) and compiles it into `package`."""
    tokens = torch.export.Dim("tokens", min=2, max=max_tokens)
    rows = torch.export.Dim("rows", min=1, max=max_tokens)
    example = (torch.zeros(_EXAMPLE_TOKENS, hidden_size), torch.arange(_EXAMPLE_ROWS))
    with torch.no_grad():
        shapes = {"hidden": {0: tokens}, "rows": {0: rows}}
        program = torch.export.export(stack.eval(), example, dynamic_shapes=shapes)
        # Freezing folds the weights into the graph as constants, pre-packed for oneDNN's products.
        torch._inductor.aoti_compile_and_package(program, package_path=str(package),
                                                 inductor_configs={"freezing": True})


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
        cfg = checkpoint.config
        key = graph_key(checkpoint, dtype)
        target = graph_location(checkpoint, dtype, key)
        if (target / PACKAGE_FILE).is_file():
            log.info("reusing the compiled query graph %s", target)
        else:
            log.info("compiling %s's query graph (%s, once: cached in %s) ...", checkpoint.name, dtype, target)
            started = time.perf_counter()
            stack = LayerStack(encoder)
            try:
                build_then_rename(target, lambda tmp: compile_package(stack, cfg.hidden_size, checkpoint.max_length,
                                                                      tmp / PACKAGE_FILE), PACKAGE_FILE)
            except Exception as exc:  # noqa: BLE001 - Inductor's many failure types (no compiler, ...), reported as one
                raise CompileFailed(f"--query-graph: compiling the graph failed on this machine ({_first_line(exc)}); "
                                    "serve without --query-graph, or install a C++ compiler (g++)") from exc
            remove_other_keys(target, key)
            log.info("compiled the query graph in %.0f s", time.perf_counter() - started)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
