"""`bgeserve serve`: load the model replicas and serve them over HTTP."""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys

log = logging.getLogger("bgeserve.serve")


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `serve` to the `bgeserve` parser."""
    from bgeserve.api.settings import ServeSettings

    parser = sub.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI, TEI and native bge-m3 routes)",
        description="Serve an embedding model over HTTP. Every flag can also be set with the "
        "environment variable BGESERVE_<FLAG> (e.g. BGESERVE_PORT=9000); flags win. "
        "DEVICE (the old service's variable) sets --devices when BGESERVE_DEVICES is unset.",
    )
    ServeSettings.add_arguments(parser)
    from bgeserve.ray.commands import add_serve_arguments  # --ray, --ray-address, ... (no Ray import)

    add_serve_arguments(parser)
    parser.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    """Builds the settings, loads the checkpoint and replicas, runs uvicorn until SIGINT/SIGTERM."""
    from bgeserve.api.logs import configure_logging
    from bgeserve.api.settings import ServeSettings, SettingsError

    try:
        # The one place the service reads the environment.
        settings = ServeSettings.from_sources(args, os.environ)
    except SettingsError as exc:
        print(f"bgeserve serve: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_json, settings.log_level)
    if args.ray:
        from bgeserve.ray.commands import serve_on_ray

        return serve_on_ray(settings, args)

    # Heavy imports (torch) only once the flags are known to be good.
    from bgeserve.engine.engine import EmbeddingEngine
    from bgeserve.errors import BgeServeError

    try:
        engine = EmbeddingEngine.load(
            settings.model,
            settings.devices,
            settings.backend_options(),
            settings.replicas_per_device,
            settings.engine_config(),
        )
    except (BgeServeError, ValueError) as exc:
        print(f"bgeserve serve: error: {exc}", file=sys.stderr)
        return 1
    connection_limit = settings.connection_limit(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    # What the service really runs with: the defaults that depend on the model and devices resolved.
    resolved = {
        "limit_concurrency": connection_limit,
        "model": engine.model_path,
        "served_model_name": settings.served_model_name or engine.name,
        "devices": ",".join(engine.devices),
        "dtype": engine.dtype,
        "max_batch_tokens": engine.max_batch_tokens,
    }
    log.info("settings: %s", json.dumps(settings.describe(resolved)))
    if settings.max_batch_tokens is not None and settings.max_batch_tokens < engine.max_length:
        log.warning(
            "--max-batch-tokens %d is below the model's limit of %d tokens: longest inputs run alone",
            settings.max_batch_tokens,
            engine.max_length,
        )

    import uvicorn

    from bgeserve.api.app import create_app
    from bgeserve.api.connections import guarded_protocol

    app = create_app(settings, engine)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the logging configured above
        access_log=False,  # the app logs each request itself, with its timings
        # h11 with a deadline on each request head. uvicorn annotates `http` as a protocol class and the
        # timeouts as int; it calls any protocol factory and takes float seconds (the ignores below).
        http=guarded_protocol(settings.read_timeout),  # type: ignore[arg-type]
        timeout_keep_alive=settings.timeout_keep_alive,  # type: ignore[arg-type]
        limit_concurrency=connection_limit,
        # SIGTERM finishes in-flight requests, but no longer than this: a stalled client cannot hold it.
        timeout_graceful_shutdown=settings.timeout_graceful_shutdown,  # type: ignore[arg-type]
    )
    return 0
