"""Ray Serve's own error answers in bgeserve's JSON shapes, for the Serve HTTP proxy.

Most errors come from the replica's app and already have bgeserve's shape. A few never reach an app:
the proxy answers them itself, in plain text: 500 when the replica handling a request died, 503 when
no replica is up, 429 when every replica is at `max_ongoing_requests` and the proxy's queue is full,
408 when Serve's own request timeout (`http_options.request_timeout_s`) passed. This middleware gives
those bgeserve's shape for the route family; the timeout becomes the 504 `timeout` of `--request-timeout`,
since to the client both mean the same: the service gave up on a request it had whole.

Serve loads it into every proxy from an environment variable set where the proxies start (the head and
worker nodes; `bgeserve serve --ray` sets it for the local cluster it starts):

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=bgeserve.ray.proxy_errors:proxy_middlewares
"""

from __future__ import annotations

import contextlib

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bgeserve.api.errors import ErrorKind, error_response, response_for_exception
from bgeserve.errors import Overloaded, RequestTimedOut, ShuttingDown

CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK_PATH = "bgeserve.ray.proxy_errors:proxy_middlewares"

# A replica that dies mid-request leaves nothing behind: the client must retry (embedding is idempotent).
REPLICA_FAILED = ErrorKind(500, "server_error", "replica_failed", "Backend")
_REWRITTEN = (408, 429, 500, 503)


def proxy_middlewares() -> list[Middleware]:
    """The callback Serve's proxy calls (see the module docstring)."""
    return [Middleware(ProxyErrorShapes)]


def _error(path: str, status: int, detail: str, retry_after: str | None):
    if status == 429:
        response = response_for_exception(path, Overloaded(
            "every replica is at its limit of requests in flight and the proxy's queue is full "
            "(max_ongoing_requests, max_queued_requests); retry later"
        ))
        if retry_after:
            response.headers["Retry-After"] = retry_after
        return response
    if status == 503:
        return response_for_exception(path, ShuttingDown(
            f"no replica can take the request now (Ray Serve: {detail or 'deployment unavailable'}); retry later"
        ))
    if status == 408:
        return response_for_exception(path, RequestTimedOut(
            f"the request did not finish within Ray Serve's request timeout (http_options.request_timeout_s; "
            f"{detail or 'no detail'}); retry it"
        ))
    return error_response(
        path,
        "the replica handling this request failed before it answered (it died or was restarted); "
        "no result was produced for this request: retry it",
        REPLICA_FAILED,
    )


class ProxyErrorShapes:
    """Pure ASGI middleware: plain-text 408/429/500/503 answers, and no answer at all, become JSON errors."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "/")
        started = False
        held: Message | None = None  # a plain-text error's start, until its body says why
        detail = b""

        async def shaped_send(message: Message) -> None:
            nonlocal started, held, detail
            if message["type"] == "http.response.start":
                started = True
                headers = {k.lower(): v for k, v in message.get("headers") or []}
                is_json = headers.get(b"content-type", b"").startswith(b"application/json")
                if message["status"] in _REWRITTEN and not is_json:
                    held = message
                    return
                await send(message)
            elif message["type"] == "http.response.body" and held is not None:
                detail += message.get("body", b"")
                if message.get("more_body", False):
                    return
                headers = {k.lower(): v for k, v in held.get("headers") or []}
                retry_after = headers.get(b"retry-after")
                response = _error(
                    path, held["status"], detail.decode("utf-8", "replace")[:500].strip(),
                    retry_after.decode() if retry_after else None,
                )
                held = None
                await response(scope, receive, send)
            else:
                await send(message)

        try:
            await self.app(scope, receive, shaped_send)
        except Exception:
            if started:
                raise
        if not started:
            # The proxy gave up without answering (the replica died): answer rather than drop it.
            with contextlib.suppress(OSError):  # the client may have gone too
                await _error(path, 500, "", None)(scope, receive, send)
