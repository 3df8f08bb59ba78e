"""The FastAPI app: routes of the three families, middleware (metrics and logs, API key, body), life cycle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from bgeserve import __version__
from bgeserve.api import routes_native, routes_openai, routes_tei
from bgeserve.api.auth import ApiKeyGuard
from bgeserve.api.docs import install_docs
from bgeserve.api.errors import install_error_handlers
from bgeserve.api.metrics import ServiceMetrics
from bgeserve.api.middleware import RequestBody, RequestObserver
from bgeserve.api.openapi import ServedLimits, install_openapi
from bgeserve.api.settings import ServeSettings
from bgeserve.api.state import Service
from bgeserve.engine.engine import EmbeddingEngine

log = logging.getLogger("bgeserve.api")


def create_app(settings: ServeSettings, engine: EmbeddingEngine) -> FastAPI:
    """Builds the app around a loaded engine; the app's lifespan starts and stops the engine."""
    model_name = settings.served_model_name or engine.name
    metrics = ServiceMetrics(
        queue_depth=lambda: engine.queue_depth,
        inflight_inputs=lambda: engine.inflight_inputs,
        max_concurrent_inputs=engine.max_inflight_inputs,
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
    install_openapi(app, ServedLimits.of(settings, engine))
    routes = {route.path for router in routers for route in router.routes if hasattr(route, "path")}
    # Added innermost first. A request meets the observer (it sees every answer, 401s and 413s too),
    # then the API key check (before a byte of the body is read), then the bounded body read.
    app.add_middleware(
        RequestBody, limit=settings.payload_limit, read_timeout=settings.read_timeout, routes=routes
    )
    app.add_middleware(ApiKeyGuard, api_key=settings.api_key)
    app.add_middleware(RequestObserver, metrics=metrics, routes=routes)
    return app
