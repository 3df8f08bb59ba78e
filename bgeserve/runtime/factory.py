"""Builds the backend a configuration names; the engine and the Embedder only see the Backend protocol."""

from __future__ import annotations

from bgeserve.models.checkpoint import Checkpoint
from bgeserve.runtime.backend import Backend

BACKENDS = ("torch", "onnx")


def create_backend(
    checkpoint: Checkpoint,
    backend: str = "torch",
    device: str = "cpu",
    dtype: str = "auto",
    threads: int | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
) -> Backend:
    """One model replica on one device; the backend resolves `dtype` ("auto" included) for its device."""
    if backend == "torch":
        from bgeserve.runtime.torch_backend import TorchBackend

        return TorchBackend(
            checkpoint, device=device, dtype=dtype, threads=threads, compile=compile, cuda_graphs=cuda_graphs
        )
    if backend == "onnx":
        if compile or cuda_graphs:
            raise ValueError(f"--{'compile' if compile else 'cuda-graphs'} applies to the torch backend only")
        from bgeserve.runtime.onnx_backend import OnnxBackend

        return OnnxBackend(checkpoint, device=device, dtype=dtype, threads=threads)
    raise ValueError(f"unknown backend {backend!r}: use {' or '.join(BACKENDS)}")
