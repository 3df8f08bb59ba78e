"""Prometheus metrics, one registry per app (never the process-global one), named `bgeserve_*`.

| name | type | labels |
|---|---|---|
| bgeserve_requests_total | counter | route, status |
| bgeserve_request_duration_seconds | histogram | route |
| bgeserve_request_inputs | histogram | |
| bgeserve_request_tokens | histogram | |
| bgeserve_tokenization_duration_seconds | histogram | |
| bgeserve_queue_duration_seconds | histogram | |
| bgeserve_batch_inference_duration_seconds | histogram | replica |
| bgeserve_batch_size | histogram | replica |
| bgeserve_batch_tokens | histogram | replica |
| bgeserve_batch_padded_tokens | histogram | replica |
| bgeserve_tokens_embedded_total | counter | replica |
| bgeserve_inputs_embedded_total | counter | replica |
| bgeserve_batch_failures_total | counter | replica |
| bgeserve_queue_depth | gauge | |
| bgeserve_inflight_inputs | gauge | |
| bgeserve_max_concurrent_inputs | gauge | |
| bgeserve_model_info | gauge (1) | model, dtype, devices |
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServiceMetrics:
    """Every metric of one service; also the engine's observer (`bgeserve.engine.observer`)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        queue_depth: Callable[[], int],
        inflight_inputs: Callable[[], int],
        max_concurrent_inputs: int,
        model: str,
        dtype: str,
        devices: list[str],
    ) -> None:
        # `*_created` series double the exposition and no dashboard reads them (a process-wide switch).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "bgeserve_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "bgeserve_request_duration_seconds", "Time from request to response", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.request_inputs = Histogram(
            "bgeserve_request_inputs", "Inputs per encode request", buckets=_SIZE_BUCKETS, registry=r
        )
        self.request_tokens = Histogram(
            "bgeserve_request_tokens", "Tokens per encode request", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.tokenization_duration = Histogram(
            "bgeserve_tokenization_duration_seconds", "Validation and tokenisation time per request",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_duration = Histogram(
            "bgeserve_queue_duration_seconds", "Time a request's inputs waited for a replica",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.inference_duration = Histogram(
            "bgeserve_batch_inference_duration_seconds", "Forward pass time per batch", ["replica"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "bgeserve_batch_size", "Inputs per batch", ["replica"], buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "bgeserve_batch_tokens", "Real tokens per batch", ["replica"], buckets=_TOKEN_BUCKETS, registry=r
        )
        self.batch_padded_tokens = Histogram(
            "bgeserve_batch_padded_tokens", "Tokens run per batch, padding included", ["replica"],
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.tokens_embedded = Counter(
            "bgeserve_tokens_embedded", "Real tokens through the model", ["replica"], registry=r
        )
        self.inputs_embedded = Counter(
            "bgeserve_inputs_embedded", "Inputs through the model", ["replica"], registry=r
        )
        self.batch_failures = Counter(
            "bgeserve_batch_failures", "Forward passes that raised", ["replica"], registry=r
        )
        Gauge("bgeserve_queue_depth", "Inputs waiting for a replica", registry=r).set_function(queue_depth)
        Gauge("bgeserve_inflight_inputs", "Input slots in use", registry=r).set_function(inflight_inputs)
        Gauge("bgeserve_max_concurrent_inputs", "Input slots in all", registry=r).set(max_concurrent_inputs)
        info = Gauge("bgeserve_model_info", "The served model", ["model", "dtype", "devices"], registry=r)
        info.labels(model=model, dtype=dtype, devices=",".join(devices)).set(1)

    # -- HTTP ---------------------------------------------------------------------------------------

    def request_done(self, route: str, status: int, seconds: float) -> None:
        """One HTTP request answered."""
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_duration.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    # -- EngineObserver -----------------------------------------------------------------------------

    def batch_done(
        self, replica: str, items: int, tokens: int, padded_tokens: int, inference_seconds: float
    ) -> None:
        self.inference_duration.labels(replica=replica).observe(inference_seconds)
        self.batch_size.labels(replica=replica).observe(items)
        self.batch_tokens.labels(replica=replica).observe(tokens)
        self.batch_padded_tokens.labels(replica=replica).observe(padded_tokens)
        self.tokens_embedded.labels(replica=replica).inc(tokens)
        self.inputs_embedded.labels(replica=replica).inc(items)

    def batch_failed(self, replica: str, items: int) -> None:
        self.batch_failures.labels(replica=replica).inc()

    def request_encoded(
        self, inputs: int, tokens: int, tokenization_seconds: float, queue_seconds: float
    ) -> None:
        self.request_inputs.observe(inputs)
        self.request_tokens.observe(tokens)
        self.tokenization_duration.observe(tokenization_seconds)
        self.queue_duration.observe(queue_seconds)
