"""Shared fixtures of the runtime tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export cache for the session: each checkpoint is exported once and shared by every test
    that does not test the cache itself."""
    return tmp_path_factory.mktemp("onnx-cache")
