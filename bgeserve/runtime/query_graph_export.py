"""The encoder layers of one text as an ahead-of-time compiled package (`torch.export`, then AOTInductor).

`runtime.query_graph` keeps the packages on disk and loads them; this module is what goes into one. Its
source, with the encoder's and attention's, is part of a package's cache key: editing any of them makes
the next start compile the graph again.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

from bgeserve.models.encoder import TransformerEncoder, run_layers
from bgeserve.models.packed import sequence_attention

# The example sizes the graph is traced at: above 1, which export would otherwise specialise on.
_EXAMPLE_TOKENS, _EXAMPLE_ROWS = 16, 2
# Freezing folds the weights into the graph as constants, which Inductor packs for oneDNN's products.
INDUCTOR_CONFIGS = {"freezing": True}


class LayerStack(nn.Module):
    """The encoder's layers on one whole sequence: (embedded tokens [T, hidden], rows [R]) -> [R, hidden].
    Holds the layers alone, so that the graph's constants are theirs (not the 1 GB embedding table)."""

    def __init__(self, encoder: TransformerEncoder) -> None:
        super().__init__()
        self.layers = encoder.layers

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return run_layers(self.layers, hidden, sequence_attention, rows)


def compile_package(stack: LayerStack, hidden_size: int, max_tokens: int, package: Path) -> None:
    """Exports `stack` with dynamic token and row counts (up to `max_tokens`) and compiles it into `package`.

    Inductor shapes its loops for the intra-op thread count it compiles under (one thread: no parallel
    loops at all) and builds for this CPU (`-march=native`): the cache keeps one package per CPU and
    thread count (`query_graph.graph_variant`)."""
    tokens = torch.export.Dim("tokens", min=2, max=max_tokens)
    rows = torch.export.Dim("rows", min=1, max=max_tokens)
    example = (torch.zeros(_EXAMPLE_TOKENS, hidden_size), torch.arange(_EXAMPLE_ROWS))
    # Inductor builds in its cache directory (/tmp/torchinductor_$USER) and would leave a copy of the
    # weights there (bge-m3: ~0.6 GB a build): the build gets a directory of its own, removed after.
    with (torch.no_grad(), tempfile.TemporaryDirectory(prefix=".inductor-", dir=package.parent) as build_dir,
          temporary_cache_dir(build_dir)):
        shapes = {"hidden": {0: tokens}, "rows": {0: rows}}
        program = torch.export.export(stack.eval(), example, dynamic_shapes=shapes)
        torch._inductor.aoti_compile_and_package(program, package_path=str(package),
                                                 inductor_configs=dict(INDUCTOR_CONFIGS))
