"""Metrics hooks the engine calls; `api/metrics.py` implements them with Prometheus."""

from __future__ import annotations

from typing import Protocol


class EngineObserver(Protocol):
    """Receives what the engine measures. Called from worker threads and the event loop alike."""

    def batch_done(
        self, replica: str, items: int, tokens: int, padded_tokens: int, inference_seconds: float
    ) -> None:
        """A replica finished one forward pass over `items` inputs (`tokens` real, `padded_tokens` run)."""

    def batch_failed(self, replica: str, items: int) -> None:
        """A replica's forward pass raised."""

    def request_encoded(
        self, inputs: int, tokens: int, tokenization_seconds: float, queue_seconds: float
    ) -> None:
        """One request got all its outputs (queue time is its slowest input's)."""


class NullObserver:
    """Measures nothing (tests, in-process use)."""

    def batch_done(
        self, replica: str, items: int, tokens: int, padded_tokens: int, inference_seconds: float
    ) -> None:
        pass

    def batch_failed(self, replica: str, items: int) -> None:
        pass

    def request_encoded(
        self, inputs: int, tokens: int, tokenization_seconds: float, queue_seconds: float
    ) -> None:
        pass
