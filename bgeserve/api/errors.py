"""The one place where errors become HTTP status codes and JSON bodies.

Two shapes, chosen by the route family:
- OpenAI and native routes (`/v1/*`, `/embeddings`, `/encode`, `/score`):
  `{"error": {"message", "type", "param", "code"}}`
- TEI routes (everything else): `{"error": "...", "error_type": "Validation" | "Empty" | ...}`
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from bgeserve.errors import (
    BgeServeError,
    EmptyInput,
    InputTooLong,
    InvalidInput,
    ModelLacksOutput,
    NonFiniteOutput,
    Overloaded,
    RequestTimedOut,
    ShuttingDown,
)

log = logging.getLogger(__name__)

BodyModel = TypeVar("BodyModel", bound=BaseModel)

OPENAI_PREFIXES = ("/v1/", "/embeddings", "/encode", "/score")


class Unauthorized(BgeServeError):
    """Missing or wrong API key."""


class PayloadTooLarge(BgeServeError):
    """The request body is over --payload-limit."""


class ClientDisconnected(BgeServeError):
    """The client closed the connection before its answer was ready."""


class BodyReadTimeout(BgeServeError):
    """The request body did not arrive within --read-timeout."""


class MalformedBody(BgeServeError):
    """The request body is not UTF-8, not JSON, or JSON Python cannot read (too deep, huge integers)."""


@dataclass(frozen=True)
class ErrorKind:
    """How one error type looks on the wire in each route family."""

    status: int
    openai_type: str
    openai_code: str
    tei_type: str
    tei_status: int | None = None  # TEI's fixed status for its error type when it differs


# Order matters: subclasses before their bases.
_KINDS: list[tuple[type[Exception], ErrorKind]] = [
    (ClientDisconnected, ErrorKind(499, "invalid_request_error", "client_closed", "Cancelled")),
    (Unauthorized, ErrorKind(401, "invalid_request_error", "invalid_api_key", "Unauthorized")),
    (PayloadTooLarge, ErrorKind(413, "invalid_request_error", "payload_too_large", "Validation")),
    (BodyReadTimeout, ErrorKind(408, "invalid_request_error", "request_timeout", "Timeout")),
    (MalformedBody, ErrorKind(400, "invalid_request_error", "invalid_json", "Validation")),
    (Overloaded, ErrorKind(429, "rate_limit_error", "overloaded", "Overloaded")),
    (EmptyInput, ErrorKind(400, "invalid_request_error", "empty_input", "Empty")),
    (InputTooLong, ErrorKind(400, "invalid_request_error", "context_length_exceeded", "Validation", 422)),
    # TEI answers a route the model type cannot serve (embed_sparse on a non-SPLADE model) as Backend.
    (ModelLacksOutput, ErrorKind(400, "invalid_request_error", "model_lacks_output", "Backend", 424)),
    (InvalidInput, ErrorKind(400, "invalid_request_error", "invalid_input", "Validation", 422)),
    (RequestTimedOut, ErrorKind(504, "timeout_error", "timeout", "Timeout")),
    (ShuttingDown, ErrorKind(503, "server_error", "unavailable", "Unhealthy")),
    (NonFiniteOutput, ErrorKind(500, "server_error", "non_finite_output", "Backend", 424)),
]
_UNEXPECTED = ErrorKind(500, "server_error", "internal_error", "Backend", 424)
# Seconds a client told 429 should wait: slots free as batches finish, well within a second.
RETRY_AFTER_SECONDS = 1
# OpenAI's `code` for errors of the HTTP layer itself (unknown route, wrong method, ...).
_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 503: "unavailable"}


def is_openai_family(path: str) -> bool:
    """True for routes that answer errors in OpenAI's shape."""
    return path.startswith(OPENAI_PREFIXES)


def error_response(
    path: str,
    message: str,
    kind: ErrorKind,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The JSON error of `kind` in the shape of the route family `path` belongs to."""
    if is_openai_family(path):
        body = {
            "error": {"message": message, "type": kind.openai_type, "param": param, "code": kind.openai_code}
        }
        return JSONResponse(body, status_code=kind.status, headers=headers)
    status = kind.tei_status or kind.status
    return JSONResponse({"error": message, "error_type": kind.tei_type}, status_code=status, headers=headers)


def response_for_exception(path: str, exc: BaseException) -> JSONResponse:
    """Maps any exception to its response; unknown ones are logged and become a 500 (TEI: 424)."""
    for error_type, kind in _KINDS:
        if isinstance(exc, error_type):
            # Checks of other fields set `param` on the error; the rest are about the inputs.
            default = "input" if isinstance(exc, InvalidInput | InputTooLong) else None
            param = getattr(exc, "param", None) or default
            return error_response(path, str(exc), kind, param, _headers_for(exc))
    log.error("unexpected error on %s", path, exc_info=exc)
    return error_response(path, f"internal error: {type(exc).__name__}: {exc}", _UNEXPECTED)


def _headers_for(exc: BaseException) -> dict[str, str] | None:
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if isinstance(exc, BodyReadTimeout):
        return {"Connection": "close"}  # the rest of the body may never come: do not wait for it
    return None


def body_error(exc: BaseException | None) -> MalformedBody:
    """What was wrong with a body that could not be decoded, from the exception the decoder raised."""
    if isinstance(exc, UnicodeDecodeError):
        return MalformedBody(
            f"request body is not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at position {exc.start})"
        )
    if isinstance(exc, json.JSONDecodeError):
        return MalformedBody(f"request body is not valid JSON ({exc.msg} at character {exc.pos})")
    if isinstance(exc, RecursionError):
        return MalformedBody("request body nests arrays or objects too deeply to be read")
    if isinstance(exc, ValueError) and "digits" in str(exc):
        return MalformedBody(f"request body holds an integer too long to be read ({exc})")
    return MalformedBody("request body could not be read as JSON")


def decode_json(raw: bytes) -> Any:
    """The body as JSON, strictly UTF-8; MalformedBody naming what is wrong otherwise."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise body_error(exc) from exc


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, bool]:
    """(message, param, is_malformed_json) from pydantic's error list, the first few errors only."""
    parts: list[str] = []
    param = None
    for error in exc.errors()[:3]:
        if error.get("type") == "json_invalid":
            detail = error.get("ctx", {}).get("error", "syntax error")
            where = error.get("loc", ("body", None))[-1]
            at = f" at character {where}" if isinstance(where, int) else ""
            return f"request body is not valid JSON ({detail}{at})", None, True
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        # Pydantic names union members in the location (e.g. `input.list[int]`); users want the field.
        loc = [x for x in loc if "[" not in x and x not in {"str", "int", "float", "bool"}]
        field = ".".join(loc)
        param = param or (loc[0] if loc else None)
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if error.get("type") == "missing":
            message = "field required"
        if error.get("type") == "model_attributes_type" and not field:
            message = "the request body must be a JSON object"
        parts.append(f"`{field}`: {message}" if field else message)
    unique = list(dict.fromkeys(parts))
    return "; ".join(unique) or "invalid request", param, False


async def json_body(request: Request) -> Any:
    """The request body as JSON, for routes that pick their schema from it; bad JSON fails as elsewhere."""
    return decode_json(await request.body())


def validated(schema: type[BodyModel], payload: Any) -> BodyModel:
    """`payload` checked against `schema`, its errors reported like those of any other route's body."""
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette names only the first route's, and `/`
    has two: POST for the task route, GET and HEAD for health)."""
    methods: set[str] = set()
    for route in request.app.routes:
        if getattr(route, "methods", None) and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Routes every error raised while serving through this module."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, malformed = _validation_message(exc)
        kind = ErrorKind(400, "invalid_request_error", "invalid_json" if malformed else "invalid_value",
                         "Validation", 400 if malformed else 422)
        return error_response(request.url.path, message, kind, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in detail:
            # FastAPI's one message for every body json.loads raised on: say which problem it was.
            return response_for_exception(request.url.path, body_error(exc.__cause__))
        tei_type = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "Validation")
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        kind = ErrorKind(exc.status_code, "invalid_request_error", code, tei_type)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_response(request.url.path, detail, kind, headers=headers or None)

    async def _known(request: Request, exc: Exception) -> JSONResponse:
        return response_for_exception(request.url.path, exc)

    for error_type, _ in _KINDS:
        app.add_exception_handler(error_type, _known)
    # Anything else is a bug or a device failure: Starlette answers with this, then logs the traceback.
    app.add_exception_handler(Exception, _known)
