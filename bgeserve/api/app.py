"""The FastAPI app: routes of the three families, payload limit, request metrics and logs, life cycle."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bgeserve import __version__
from bgeserve.api import routes_native, routes_openai, routes_tei
from bgeserve.api.docs import install_docs
from bgeserve.api.errors import PayloadTooLarge, install_error_handlers, response_for_exception
from bgeserve.api.metrics import ServiceMetrics
from bgeserve.api.settings import ServeSettings
from bgeserve.api.state import Service
from bgeserve.engine.engine import EmbeddingEngine

log = logging.getLogger("bgeserve.api")


def create_app(settings: ServeSettings, engine: EmbeddingEngine) -> FastAPI:
    """Builds the app around a loaded engine; the app's lifespan starts and stops the engine."""
    model_name = settings.served_model_name or engine.name
    metrics = ServiceMetrics(
        queue_depth=lambda: engine.queue_depth,
        inflight_inputs=lambda: engine.slots.taken,
        max_concurrent_inputs=engine.slots.capacity,
        model=model_name,
        dtype=engine.dtype,
        devices=engine.devices,
    )
    engine.set_observer(metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        log.info("serving %s on %s", model_name, ", ".join(engine.devices))
        try:
            yield
        finally:
            # uvicorn has already waited for in-flight requests; drain whatever is still queued.
            log.info("shutting down: finishing queued work")
            await engine.stop()

    app = FastAPI(
        title="bgeserve",
        version=__version__,
        description="Embeddings of BAAI/bge-m3 (dense, sparse, ColBERT) and BERT-family models, "
        "over OpenAI-compatible, TEI-compatible and native routes.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = Service(settings=settings, engine=engine, metrics=metrics, model_name=model_name)
    install_error_handlers(app)
    install_docs(app)
    routers = [routes_openai.router, routes_tei.router, routes_tei.health_router, routes_native.router]
    for router in routers:
        app.include_router(router)
    routes = {route.path for router in routers for route in router.routes if hasattr(route, "path")}
    # Outermost first: the observer sees every answer, the 413s of the payload limit included.
    app.add_middleware(PayloadLimit, limit=settings.payload_limit)
    app.add_middleware(RequestObserver, metrics=metrics, routes=routes)
    return app


class PayloadLimit:
    """Reads the whole body up front and answers 413 once it passes `limit` bytes (chunked too).

    Every route takes JSON, so a body sent with another content type (curl's `-d` says form data)
    is read as JSON too rather than refused.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(
            f"request body is larger than the limit of {self.limit} bytes (--payload-limit)"
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await response_for_exception(scope["path"], too_large)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await response_for_exception(scope["path"], too_large)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        if size:
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            # After the body, the only message left is the disconnect (watched by the routes).
            return await receive()

        await self.app(scope, replay, send)


class RequestObserver:
    """Counts and times every HTTP request by route and status, and logs one line per request."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            seconds = time.monotonic() - started
            path = scope["path"]
            # Unknown paths share one label, so random URLs cannot blow up the metric's cardinality.
            route = path if path in self.routes else "other"
            self.metrics.request_done(route, status, seconds)
            if path not in ("/health", "/metrics"):
                log.info(
                    "%s %s %d %.1fms",
                    scope["method"],
                    path,
                    status,
                    seconds * 1000,
                    extra={"method": scope["method"], "path": path, "status": status,
                           "duration_ms": round(seconds * 1000, 2)},
                )
