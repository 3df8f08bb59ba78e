"""Per-replica engine figures through Ray's metrics export, beside each replica's own /metrics.

Behind the Serve proxy, `GET /metrics` reaches whichever replica the router picks, so one scrape sees
one replica. Ray's metrics agent on every node exports what `ray.serve.metrics` records, tagged with
`deployment`, `replica` and `application`: scraping those agents (Ray's Prometheus service discovery)
gives every replica's figures. HTTP counts and latencies come from Serve's own `ray_serve_*` metrics.
"""

from __future__ import annotations

from collections.abc import Callable

from ray.serve import metrics

from bgeserve.engine.observer import EngineObserver

_LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
_SIZE_BOUNDARIES: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class RayEngineMetrics:
    """An `EngineObserver` that records into Ray's metrics and passes every call on to `inner`
    (the app's Prometheus registry, so the replica's own /metrics stays complete)."""

    def __init__(self, inner: EngineObserver, queue_depth: Callable[[], int], inflight: Callable[[], int]) -> None:
        self.inner = inner
        self._queue_depth = queue_depth
        self._inflight = inflight
        # Ray prefixes `ray_`: these are ray_bgeserve_* in Prometheus.
        self.tokens = metrics.Counter("bgeserve_tokens_embedded", description="Real tokens through the model")
        self.inputs = metrics.Counter("bgeserve_inputs_embedded", description="Inputs through the model")
        self.failures = metrics.Counter("bgeserve_batch_failures", description="Forward passes that raised")
        self.batch_seconds = metrics.Histogram(
            "bgeserve_batch_inference_seconds", description="Forward pass time per batch",
            boundaries=_LATENCY_BOUNDARIES,
        )
        self.batch_size = metrics.Histogram(
            "bgeserve_batch_size", description="Inputs per batch", boundaries=_SIZE_BOUNDARIES
        )
        self.queue_seconds = metrics.Histogram(
            "bgeserve_queue_seconds", description="Time a request's inputs waited for the model",
            boundaries=_LATENCY_BOUNDARIES,
        )
        self.queue_depth = metrics.Gauge("bgeserve_queue_depth", description="Inputs waiting for the model")
        self.inflight_inputs = metrics.Gauge("bgeserve_inflight_inputs", description="Input slots in use")

    def _gauges(self) -> None:
        self.queue_depth.set(self._queue_depth())
        self.inflight_inputs.set(self._inflight())

    def batch_done(
        self, replica: str, items: int, tokens: int, padded_tokens: int, inference_seconds: float
    ) -> None:
        self.inner.batch_done(replica, items, tokens, padded_tokens, inference_seconds)
        if tokens > 0:  # Ray's counters refuse an increment of 0
            self.tokens.inc(tokens)
        if items > 0:
            self.inputs.inc(items)
        self.batch_seconds.observe(inference_seconds)
        self.batch_size.observe(items)
        self._gauges()

    def batch_failed(self, replica: str, items: int) -> None:
        self.inner.batch_failed(replica, items)
        self.failures.inc()

    def request_encoded(
        self, inputs: int, tokens: int, tokenization_seconds: float, queue_seconds: float
    ) -> None:
        self.inner.request_encoded(inputs, tokens, tokenization_seconds, queue_seconds)
        self.queue_seconds.observe(queue_seconds)
        self._gauges()
