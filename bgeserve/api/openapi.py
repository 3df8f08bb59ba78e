"""The OpenAPI document (`/openapi.json`) as this server answers: its limits, its errors, its API key.

FastAPI documents request models and a generic 422; what it cannot know is filled in here once: the
limits of the served model and settings (batch sizes, token-id and dimension ranges), the error
answers of each operation in its family's shape, and the bearer key when one is required.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from bgeserve.api.auth import HEALTH_PATHS, is_open
from bgeserve.api.errors import is_openai_family
from bgeserve.api.schemas import LIMIT, OpenAIError, TEIError

if TYPE_CHECKING:
    from bgeserve.api.settings import ServeSettings
    from bgeserve.engine.engine import EmbeddingEngine

_OPENAI_ERRORS = {
    400: "malformed body, wrong type or bad value, input over the limit",
    408: "the body did not arrive within --read-timeout",
    413: "body over --payload-limit",
    429: "every input slot is taken; retry after the Retry-After seconds",
    500: "the model produced a non-finite output",
    503: "starting up or shutting down",
    504: "--request-timeout passed",
}
_TEI_ERRORS = {
    400: "malformed body, empty input",
    408: _OPENAI_ERRORS[408],
    413: _OPENAI_ERRORS[413],
    422: "wrong type, bad value, input over the limit",
    424: "the model cannot give this output, or gave a non-finite one",
    429: _OPENAI_ERRORS[429],
    503: _OPENAI_ERRORS[503],
    504: _OPENAI_ERRORS[504],
}
_UNAUTHORIZED = "missing or wrong API key"
_SECURITY_SCHEME = "bearer"


@dataclass(frozen=True)
class ServedLimits:
    """What the request schemas' `LIMIT` names stand for on this server."""

    batch: int
    openai_batch: int
    vocab_size: int
    hidden_size: int
    min_length: int
    max_length: int
    api_key: bool

    @classmethod
    def of(cls, settings: ServeSettings, engine: EmbeddingEngine) -> ServedLimits:
        return cls(
            batch=settings.max_client_batch_size,
            openai_batch=settings.max_openai_batch_size,
            vocab_size=engine.vocab_size,
            hidden_size=engine.hidden_size,
            min_length=engine.min_token_input,
            max_length=engine.max_length,
            api_key=settings.api_key is not None,
        )

    def value(self, name: str) -> int:
        values = {
            "batch": self.batch,
            "batch_less_one": self.batch - 1,  # /similarity: the source sentence counts too
            "openai_batch": self.openai_batch,
            "vocab_max": self.vocab_size - 1,
            "hidden_size": self.hidden_size,
            "min_length": self.min_length,
            "max_length": self.max_length,
        }
        return values[name]


def install_openapi(app: FastAPI, limits: ServedLimits) -> None:
    """Makes `app.openapi()` (and so /openapi.json) the document described above, built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _fill_limits(schema, limits)
            _document_errors(schema, limits.api_key)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _fill_limits(node: Any, limits: ServedLimits) -> None:
    if isinstance(node, dict):
        for keyword, name in node.pop(LIMIT, {}).items():
            node[keyword] = limits.value(name)
        for child in node.values():
            _fill_limits(child, limits)
    elif isinstance(node, list):
        for child in node:
            _fill_limits(child, limits)


def _document_errors(schema: dict[str, Any], api_key: bool) -> None:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in (OpenAIError, TEIError):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas[model.__name__] = body
    if api_key:
        components["securitySchemes"] = {_SECURITY_SCHEME: {"type": "http", "scheme": "bearer"}}
    for path, operations in schema.get("paths", {}).items():
        openai = is_openai_family(path)
        ref = {"$ref": f"#/components/schemas/{(OpenAIError if openai else TEIError).__name__}"}
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            # FastAPI's own 422 body is not what this server sends; the OpenAI family never says 422.
            responses.pop("422", None)
            errors = dict(_OPENAI_ERRORS if openai else _TEI_ERRORS) if "requestBody" in operation else {}
            protected = not is_open(method.upper(), path)
            if api_key and protected:
                operation["security"] = [{_SECURITY_SCHEME: []}]
                errors[401] = _UNAUTHORIZED
            if method == "get" and path in HEALTH_PATHS:
                errors[503] = "a model replica is not running"
            for status, description in sorted(errors.items()):
                responses[str(status)] = {"description": description, "content": {"application/json": {"schema": ref}}}
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
