"""Errors raised by the engine itself (the shared ones live in `bgeserve.errors`)."""

from __future__ import annotations

from bgeserve.errors import BgeServeError, InvalidInput


class EmptyInput(InvalidInput):
    """No inputs at all, or an input with no text / no token ids (TEI's `Empty`, HTTP 400)."""


class RequestTimedOut(BgeServeError):
    """A request did not get its outputs within the configured request timeout."""


class NonFiniteOutput(BgeServeError):
    """The model produced NaN or infinity for an input; never handed to the caller as numbers."""


class ShuttingDown(BgeServeError):
    """The engine is stopping and takes no new work (HTTP 503)."""
