"""Bearer API key check (`--api-key`), before anything of the request body is read.

/health (and its aliases) and the API docs stay open, so load balancers and browsers need no secret.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from bgeserve.api.docs import ASSETS_URL
from bgeserve.api.errors import Unauthorized, response_for_exception

# Health probes: /health, TEI's `/`, SageMaker's `/ping` (GET and HEAD).
HEALTH_PATHS = ("/health", "/", "/ping")
# GET/HEAD paths served without a key: the health probes and the docs.
OPEN_PATHS = frozenset({*HEALTH_PATHS, "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def is_open(method: str, path: str) -> bool:
    """True for the requests that need no API key."""
    return method in ("GET", "HEAD") and (path in OPEN_PATHS or path.startswith(ASSETS_URL + "/"))


def check_api_key(expected: str, authorization: bytes | None) -> None:
    """Raises Unauthorized (HTTP 401) unless `authorization` is `Bearer <expected>`."""
    scheme, _, token = (authorization or b"").partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    # Constant-time comparison, so response timing does not leak the key.
    if not secrets.compare_digest(token.strip(), expected.encode()):
        raise Unauthorized("invalid API key")


class ApiKeyGuard:
    """ASGI middleware: answers 401 before the body is read (or parsed) when the key is missing or wrong."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.api_key is not None and not is_open(scope["method"], scope["path"]):
            header = dict(scope.get("headers") or []).get(b"authorization")
            try:
                check_api_key(self.api_key, header)
            except Unauthorized as exc:
                await response_for_exception(scope["path"], exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)
