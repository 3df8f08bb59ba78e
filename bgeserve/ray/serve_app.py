"""The Ray Serve application: every replica is one bgeserve engine behind the same FastAPI app.

`serve run bgeserve.ray:app model=/models/bge-m3 num_replicas=4` (or a Serve config file, or
`bgeserve serve --ray`) deploys `EmbeddingDeployment`. Each replica loads the model on its one device,
runs its own token-budget batcher, and serves the app `create_app` builds for `bgeserve serve`: same
routes, error shapes, API key, payload limit and 429s. Serve's proxy only picks the replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.serve import Application, Deployment

from bgeserve.api.settings import ServeSettings
from bgeserve.engine.engine import EmbeddingEngine
from bgeserve.ray.options import RayServeOptions

log = logging.getLogger("bgeserve.ray")

APP_NAME = "bgeserve"


def build_engine(settings: ServeSettings) -> EmbeddingEngine:
    """Loads the checkpoint and the model replicas the settings ask for and warms them up: what
    `bgeserve serve` does before it serves (the one place the Ray layer builds an engine)."""
    return EmbeddingEngine.load(
        settings.model,
        settings.devices,
        settings.backend_options(),
        settings.replicas_per_device,
        settings.engine_config(),
    )


@serve.deployment
@serve.ingress()  # the app is built per replica, around its engine (`__serve_build_asgi_app__`)
class EmbeddingDeployment:
    """One Serve replica: one engine on one device, serving bgeserve's FastAPI app.

    Serve runs the app's lifespan after `__serve_build_asgi_app__` (it starts the engine) and again
    when the replica stops (it finishes queued work, then stops the engine): the same life cycle as
    under uvicorn.
    """

    # Serve awaits an async constructor; mypy allows only a plain one.
    async def __init__(self, settings: ServeSettings) -> None:  # type: ignore[misc]
        logger = logging.getLogger("bgeserve")
        logger.setLevel(settings.log_level.upper())
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)  # Ray keeps a replica's stderr in its log files
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
        self._settings = settings
        # Off the replica's event loop: loading the full model takes a while.
        self._engine = await asyncio.to_thread(build_engine, settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from bgeserve.api.app import create_app
        from bgeserve.ray.metrics import RayEngineMetrics

        app = create_app(self._settings, self._engine)
        engine = self._engine
        engine.set_observer(
            RayEngineMetrics(app.state.service.metrics, lambda: engine.queue_depth, lambda: engine.inflight_inputs)
        )
        log.info("replica ready: %s on %s (%s)", engine.name, ", ".join(engine.devices), engine.dtype)
        return app

    def check_health(self) -> None:
        """Serve's health check: raising marks the replica unhealthy, and Serve replaces it."""
        if not self._engine.healthy:
            alive = self._engine.replicas.healthy
            raise RuntimeError(
                "bgeserve engine unhealthy: " + ("not serving (stopped)" if alive else "a model thread died")
            )


def build_application(options: RayServeOptions) -> Application:
    """The Serve application for `options` (the deployment's options are what `serve build` writes)."""
    # @serve.deployment made the class a Deployment; mypy keeps a class decorator's input type.
    deployment = cast(Deployment, EmbeddingDeployment)
    return deployment.options(**options.deployment_options()).bind(options.replica_settings())


def app(args: dict[str, Any]) -> Application:
    """Serve application builder: `serve run bgeserve.ray:app model=/models/bge-m3 num_replicas=4`.

    Keys: every `bgeserve serve` setting (`model`, `dtype`, `api_key`, `max_concurrent_requests`, ...)
    and the Ray keys of `RayServeOptions` (`num_replicas`, `min_replicas`, `max_replicas`,
    `num_gpus_per_replica`, `num_cpus_per_replica`, `max_ongoing_requests`, ...).
    """
    if args and {"host", "port"} & set(args):
        log.warning("host and port are Serve's http_options (the config file's, or serve run's 127.0.0.1:8000), "
                    "not arguments of the application: ignored")
    return build_application(RayServeOptions.from_args(args))


def proxy_http_options(settings: ServeSettings) -> dict[str, Any]:
    """Serve's `http_options` for `bgeserve serve --ray`: the proxy listens where `bgeserve serve` would,
    and bounds a whole request by `--request-timeout` (routing and Serve's queue included, which the
    replica's own timer does not see), so that no request outlives it even if Ray loses its replica."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "keep_alive_timeout_s": max(1, round(settings.timeout_keep_alive)),
    }
    if settings.request_timeout is not None:
        options["request_timeout_s"] = settings.request_timeout
    return options


def run_serve(settings: ServeSettings, ray_address: str | None, ray_args: Mapping[str, Any] | None = None) -> int:
    """`bgeserve serve --ray`: deploys the app on a Ray cluster (a new local one when `ray_address` is None
    and RAY_ADDRESS is unset) with Serve's proxy on `settings.host:settings.port`, and serves until
    SIGINT/SIGTERM; then the app is deleted (replicas finish their in-flight requests) and a local Ray
    started here is shut down."""
    import ray

    from bgeserve.ray.commands import ray_init_arguments
    from bgeserve.ray.proxy_errors import CALLBACK_PATH, CALLBACK_VARIABLE

    options = dataclasses.replace(RayServeOptions.from_args(ray_args), settings=settings)
    if settings.devices not in ("auto", "cpu"):
        log.warning("--devices %s is not used with --ray: each replica gets its device from Ray "
                    "(--ray-arg num_gpus_per_replica=1 for one GPU each)", settings.devices)
    init = ray_init_arguments(ray_address)
    started_here = init.get("address") == "local" and not ray.is_initialized()
    if started_here:
        # The proxies of the cluster started here inherit it: Ray's own errors get bgeserve's shapes.
        os.environ.setdefault(CALLBACK_VARIABLE, CALLBACK_PATH)
    ray.init(**init)
    # After ray.init, which installs handlers of its own: SIGTERM must drain, not kill.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options=proxy_http_options(settings))
        serve.run(build_application(options), name=APP_NAME, route_prefix="/")
        log.info("serving on http://%s:%d through Ray Serve", settings.host, settings.port)
        while not stop.wait(1.0):
            pass
        log.info("shutting down: replicas finish their in-flight requests")
        serve.delete(APP_NAME)
        if started_here:
            serve.shutdown()
    finally:
        if started_here:
            ray.shutdown()
    return 0
