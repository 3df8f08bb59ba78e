"""bgeserve: serve BAAI/bge-m3 (dense, sparse, ColBERT) and BERT-family embedding models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Embedder", "__version__"]


def __getattr__(name: str):
    # Lazy so that `bgeserve --help` and the doctor start without importing torch.
    if name == "Embedder":
        from bgeserve.embedder import Embedder

        return Embedder
    raise AttributeError(name)
