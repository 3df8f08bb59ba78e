"""The generated checkpoint for `make bench`: written once into the cache, then reused."""

from __future__ import annotations

from bgeserve.bench.model_source import default_cache_dir, synthetic_checkpoint
from bgeserve.models.checkpoint import load_checkpoint


def test_generated_once_then_reused(tmp_path):
    messages: list[str] = []
    stale = tmp_path / "synthetic" / "bge-m3-tiny-seed0-0123456789ab"  # another generator digest
    stale.mkdir(parents=True)
    first = synthetic_checkpoint("tiny", tmp_path, log=messages.append)
    assert (first / "config.json").exists() and (first / ".complete").exists()
    assert not stale.exists(), "an older generation of the same size is removed"
    assert load_checkpoint(str(first)).capabilities.sparse
    stamp = (first / "pytorch_model.bin").stat().st_mtime_ns
    count = len(messages)
    assert synthetic_checkpoint("tiny", tmp_path, log=messages.append) == first
    assert (first / "pytorch_model.bin").stat().st_mtime_ns == stamp and len(messages) == count
    assert not list((tmp_path / "synthetic").glob(".*")), "no staging directory is left behind"


def test_default_cache_dir():
    assert str(default_cache_dir({"XDG_CACHE_HOME": "/x"})) == "/x/bgeserve"
    assert default_cache_dir({}).name == "bgeserve"
