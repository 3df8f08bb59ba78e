"""Builds the backends BackendOptions name; the engine and the Embedder only see the Backend protocol."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

from bgeserve.core import BackendOptions
from bgeserve.models.checkpoint import Checkpoint
from bgeserve.runtime.backend import Backend


def create_backend(checkpoint: Checkpoint, device: str = "cpu", options: BackendOptions | None = None) -> Backend:
    """One model replica on one device; the backend resolves `options.dtype` ("auto" too) for its device."""
    options = options or BackendOptions()
    if options.backend == "onnx":
        from bgeserve.runtime.onnx_backend import OnnxBackend

        return OnnxBackend(checkpoint, device, options)
    from bgeserve.runtime.torch_backend import TorchBackend

    return TorchBackend(checkpoint, device, options)


def create_backends(
    checkpoint: Checkpoint, devices: Sequence[str], options: BackendOptions, replicas_per_device: int = 1
) -> list[Backend]:
    """One backend per GPU and `replicas_per_device` on the CPU, all with `options`.

    CPU replicas get `options.threads` each, by default the cores split evenly between them; for torch
    that count is set once for the process, before any replica loads.
    """
    on_cpu = sum(max(1, replicas_per_device) for device in devices if device == "cpu")
    cpu_options = options
    if on_cpu:
        cpu_options = replace(options, threads=options.threads or max(1, (os.cpu_count() or 1) // on_cpu))
        if options.backend == "torch":
            use_torch_threads(cpu_options.threads)
    backends: list[Backend] = []
    for device in devices:
        count = max(1, replicas_per_device) if device == "cpu" else 1
        backends += [
            create_backend(checkpoint, device, cpu_options if device == "cpu" else options) for _ in range(count)
        ]
    return backends


def use_torch_threads(threads: int | None) -> None:
    """torch's intra-op threads, for the whole process (every torch replica in it shares the pool)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
