"""What every route reaches through `request.app.state.service`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from bgeserve.api.metrics import ServiceMetrics
from bgeserve.api.settings import ServeSettings
from bgeserve.engine.engine import EmbeddingEngine

log = logging.getLogger("bgeserve.api")

# Characters of a client-supplied model name kept and logged: names are short, a client may send megabytes.
MODEL_NAME_CHARS = 100


@dataclass
class Service:
    """The engine, the settings and the metrics of one app."""

    settings: ServeSettings
    engine: EmbeddingEngine
    metrics: ServiceMetrics
    model_name: str
    _mismatched_names: set[str] = field(default_factory=set)

    def note_requested_model(self, name: str | None) -> None:
        """OpenAI clients must name a model; another name is served anyway and logged once."""
        if not name or name == self.model_name:
            return
        if len(name) > MODEL_NAME_CHARS:
            name = f"{name[:MODEL_NAME_CHARS]}... ({len(name)} characters)"
        if name in self._mismatched_names:
            return
        if len(self._mismatched_names) < 100:  # bounded: clients can send any string
            self._mismatched_names.add(name)
            log.warning("request names model %r; serving %r", name, self.model_name)


def service(request: Request) -> Service:
    """FastAPI dependency: the Service of the app handling `request`."""
    return request.app.state.service


# Route parameter type: `svc: ServiceDep`.
ServiceDep = Annotated[Service, Depends(service)]
