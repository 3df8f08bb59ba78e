"""The words every layer speaks: what a caller asks for, what one input gives back, what a model can do,
and how its replicas run.

They sit below everything (api, engine, runtime and models all import them, and they import only
`bgeserve.errors`), as text-embeddings-inference keeps its shared types in its `core` crate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from bgeserve.errors import ModelLacksOutput

# The bge-m3 head files; a checkpoint without one cannot give that output.
SPARSE_HEAD_FILE = "sparse_linear.pt"
COLBERT_HEAD_FILE = "colbert_linear.pt"

# Precision names as bgeserve spells them, with the long names TEI's /info and torch use.
PRECISION_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8"}


@dataclass(frozen=True)
class OutputRequest:
    """Which outputs one forward pass must produce."""

    dense: bool = True
    sparse: bool = False
    colbert: bool = False
    # Raw last hidden states of every token (TEI's /embed_all).
    token_embeddings: bool = False
    normalize_dense: bool = True


@dataclass
class ItemOutput:
    """Everything computed for one input sequence, on the host, as numpy."""

    num_tokens: int
    dense: np.ndarray | None = None  # [hidden] float32
    lexical_weights: dict[str, float] | None = None  # token id (decimal str) -> weight
    colbert: np.ndarray | None = None  # [num_tokens - 1, hidden] float32
    token_embeddings: np.ndarray | None = None  # [num_tokens, hidden] float32


T = TypeVar("T")


def asked(values: Sequence[T | None]) -> list[T]:
    """One output of every item, where the caller asked for it: the backends always fill what was asked,
    so a None is a bug upstream, never the client's error."""
    present = [v for v in values if v is not None]
    if len(present) != len(values):
        raise RuntimeError("the backend left out an output it was asked for")
    return present


@dataclass(frozen=True)
class SimpleToken:
    """One token as /tokenize reports it (TEI's `SimpleToken`): offsets are None for special tokens."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


@dataclass(frozen=True)
class Capabilities:
    """What a loaded model can return."""

    dense: bool
    sparse: bool
    colbert: bool

    def require(self, want: OutputRequest, model: str) -> None:
        """Raises ModelLacksOutput when `want` asks for a head this model does not have."""
        if want.sparse and not self.sparse:
            raise ModelLacksOutput("sparse lexical weights", model, SPARSE_HEAD_FILE)
        if want.colbert and not self.colbert:
            raise ModelLacksOutput("ColBERT vectors", model, COLBERT_HEAD_FILE)


# The runtimes a model can run on.
BACKENDS = ("torch", "onnx")


@dataclass(frozen=True)
class BackendOptions:
    """Built once, from `bgeserve serve`'s flags (`ServeSettings.backend_options`) or `Embedder`'s
    arguments, and given as it is to every replica: in this process, or in a Ray Serve or Ray Data actor.

    `threads`: CPU threads of one replica (None: the cores split between the CPU replicas). torch's pool
    is one per process, so its replicas share the setting (`runtime.factory.use_torch_threads`); each
    onnxruntime session has its own. `query_graph`: a lone text runs through an AOTInductor-compiled graph
    of the encoder layers on the CPU (`runtime.query_graph`).
    """

    backend: str = "torch"
    dtype: str = "auto"
    threads: int | None = None
    compile: bool = False
    cuda_graphs: bool = False
    query_graph: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: use {' or '.join(BACKENDS)}")
        if self.backend == "onnx" and (self.compile or self.cuda_graphs or self.query_graph):
            flag = "compile" if self.compile else "cuda-graphs" if self.cuda_graphs else "query-graph"
            raise ValueError(f"--{flag} applies to the torch backend only")
        if self.compile and self.query_graph:
            raise ValueError("--query-graph applies to the eager torch backend: not with --compile")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, not {self.threads}")
