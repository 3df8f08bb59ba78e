"""Real `bgeserve serve` processes on loopback, started once per session and shared by the api tests."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One `python -m bgeserve serve` child process; `url` once /health answers 200."""

    def __init__(
        self, args: list[str], log_file: Path, env: dict[str, str] | None = None, open_files: int | None = None
    ) -> None:
        """`open_files`: the child's soft RLIMIT_NOFILE (to test what happens at the descriptor limit)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = log_file
        self._log = log_file.open("w")

        def limit_open_files() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        self.process = subprocess.Popen(
            [sys.executable, "-m", "bgeserve", "serve", "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "BGESERVE_THREADS": "1", **(env or {})},
            preexec_fn=limit_open_files if open_files is not None else None,
        )
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_file.read_text()

    def stop(self) -> int:
        """SIGTERM (graceful), then the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def minilm_server(tmp_path_factory) -> Iterator[Server]:
    """The bundled MiniLM (no --model), behind an API key."""
    server = Server(
        ["--devices", "cpu", "--dtype", "fp32", "--api-key", API_KEY, "--served-model-name", "minilm"],
        tmp_path_factory.mktemp("logs") / "minilm.log",
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def m3_server(m3_checkpoint, tmp_path_factory) -> Iterator[Server]:
    """The tiny bge-m3 on two CPU replicas, configured through environment variables."""
    server = Server(
        ["--model", str(m3_checkpoint), "--dtype", "fp32"],
        tmp_path_factory.mktemp("logs") / "m3.log",
        env={"DEVICE": "cpu", "BGESERVE_REPLICAS_PER_DEVICE": "2", "BGESERVE_BATCH_WAIT_MS": "5"},
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def m3_embedder(m3_checkpoint):
    """The same tiny bge-m3 in process, for 'embedded alone' references."""
    from bgeserve.embedder import Embedder

    return Embedder(model=str(m3_checkpoint), device="cpu", dtype="fp32", threads=1)


@pytest.fixture(scope="session")
def minilm_embedder(minilm_path):
    from bgeserve.embedder import Embedder

    return Embedder(model=str(minilm_path), device="cpu", dtype="fp32", threads=1)


def read_texts() -> list[str]:
    """The mixed corpus the benchmarks use: short and long lines, many scripts, fuzz lines."""
    from bgeserve.data import sample_texts

    return sample_texts()


@pytest.fixture(scope="session")
def mixed_texts() -> list[str]:
    return read_texts()
