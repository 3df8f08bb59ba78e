"""Bearer API key check (`--api-key`); /health stays open so load balancers need no secret."""

from __future__ import annotations

import secrets

from fastapi import Request

from bgeserve.api.errors import Unauthorized


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: raises Unauthorized (HTTP 401) unless `Authorization: Bearer <key>` matches."""
    expected: str | None = request.app.state.service.settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    # Constant-time comparison, so response timing does not leak the key.
    if not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthorized("invalid API key")
