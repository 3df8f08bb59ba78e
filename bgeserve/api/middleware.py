"""ASGI middleware around the routes: request metrics and logs, and the bounded read of each body."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bgeserve.api.errors import BodyReadTimeout, PayloadTooLarge, body_error, response_for_exception
from bgeserve.api.metrics import ServiceMetrics

log = logging.getLogger("bgeserve.api")

# Status recorded for a request whose client left before any answer (nginx's "client closed request").
CLIENT_CLOSED = 499


class RequestBody:
    """Reads the whole body up front, within `limit` bytes (413, chunked too) and `read_timeout` seconds
    (408, and the connection closed: a client that stalls mid-upload cannot hold it, or a shutdown).

    A body of a known route must be UTF-8 (400 otherwise). Every route takes JSON, so a body sent with
    another content type (curl's `-d` says form data) is read as JSON too rather than refused.
    """

    def __init__(self, app: ASGIApp, limit: int, read_timeout: float, routes: set[str]) -> None:
        self.app = app
        self.limit = limit
        self.read_timeout = read_timeout
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        too_large = PayloadTooLarge(
            f"request body is larger than the limit of {self.limit} bytes (--payload-limit)"
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await response_for_exception(path, too_large)(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.read_timeout):
                raw = await self._read(receive)
        except PayloadTooLarge as exc:
            await response_for_exception(path, exc)(scope, receive, send)
            return
        except TimeoutError:
            timed_out = BodyReadTimeout(
                f"the request body did not arrive within {self.read_timeout:g} s (--read-timeout)"
            )
            await response_for_exception(path, timed_out)(scope, receive, send)
            return
        if raw is None:
            return  # the client left mid-body; RequestObserver records it as closed by the client
        if raw and path in self.routes:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                await response_for_exception(path, body_error(exc))(scope, receive, send)
                return
        body: Message | None = {"type": "http.request", "body": raw, "more_body": False}
        if raw:
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

    async def _read(self, receive: Receive) -> bytes | None:
        """The body, or None when the client disconnected first; PayloadTooLarge past the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise PayloadTooLarge(
                    f"request body is larger than the limit of {self.limit} bytes (--payload-limit)"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class RequestObserver:
    """Counts and times every HTTP request by route and status, and logs one line per request.

    A request that ends with no answer sent was left by its client (499); one that raised is a 500.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status: int | None = None

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except BaseException:
            self._record(scope, status or 500, time.monotonic() - started)
            raise
        self._record(scope, status or CLIENT_CLOSED, time.monotonic() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
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
