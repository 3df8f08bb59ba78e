"""BackendOptions, built once and handed down whole; the factory that turns it into replicas."""

from __future__ import annotations

import os

import pytest
import torch

from bgeserve.core import BackendOptions
from bgeserve.models.checkpoint import load_checkpoint
from bgeserve.runtime.factory import create_backends


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"backend": "tensorrt"}, "unknown backend"),
        ({"backend": "onnx", "compile": True}, "--compile applies to the torch backend only"),
        ({"backend": "onnx", "cuda_graphs": True}, "--cuda-graphs applies to the torch backend only"),
        ({"threads": 0}, "threads must be at least 1"),
    ],
)
def test_options_that_cannot_run_are_refused_when_built(options, words):
    with pytest.raises(ValueError, match=words):
        BackendOptions(**options)


def test_cpu_replicas_split_the_cores_and_torch_threads_are_set_once(m3_checkpoint, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    ckpt = load_checkpoint(str(m3_checkpoint))
    backends = create_backends(ckpt, ["cpu"], BackendOptions(dtype="fp32"), replicas_per_device=2)
    assert len(backends) == 2 and all(b.dtype == "fp32" for b in backends)
    # One process-wide setting, made before the replicas load (not once per replica, last one winning).
    assert calls == [max(1, (os.cpu_count() or 1) // 2)]


def test_onnx_replicas_get_their_share_of_the_cores_each(m3_checkpoint, tmp_path, monkeypatch):
    from bgeserve import cache_files
    from bgeserve.runtime import onnx_cache

    monkeypatch.setattr(onnx_cache, "default_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(cache_files, "_writable_dir", lambda path: False)
    ckpt = load_checkpoint(str(m3_checkpoint))
    backends = create_backends(ckpt, ["cpu"], BackendOptions(backend="onnx", threads=1), replicas_per_device=2)
    assert [b.session.get_session_options().intra_op_num_threads for b in backends] == [1, 1]
