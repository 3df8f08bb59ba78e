"""Typed errors shared by every layer. `api/` maps them to HTTP status and JSON in one place."""

from __future__ import annotations


class BgeServeError(Exception):
    """Base class of every error bgeserve raises on purpose."""


class ModelNotFound(BgeServeError):
    """The model path or hub id cannot be resolved to a checkpoint directory."""


class InvalidCheckpoint(BgeServeError):
    """The directory exists but is not a checkpoint we can load."""


class ModelLacksOutput(BgeServeError):
    """An output (sparse, colbert) was asked of a model that has no head for it."""

    def __init__(self, output: str, model: str, missing_file: str) -> None:
        self.output = output
        super().__init__(
            f"model {model!r} cannot return {output}: it has no {missing_file} "
            f"(only bge-m3 style checkpoints ship that head)"
        )


class InputTooLong(BgeServeError):
    """An input is longer than the model accepts and truncation was not allowed."""

    def __init__(self, index: int, length: int | None, limit: int) -> None:
        # length None: only known to be over the limit (a long text is tokenised only as far as needed).
        self.index, self.length, self.limit = index, length, limit
        size = f"has {length} tokens, more" if length is not None else "is longer"
        super().__init__(f"input {index} {size} than the model's limit of {limit}; pass truncate=true to cut it")


class InvalidInput(BgeServeError, ValueError):
    """The caller's input is malformed (wrong type, empty, ids out of vocabulary, ...). `param`: the request
    field at fault, when it is not the inputs themselves."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Overloaded(BgeServeError):
    """Every request slot is taken; the caller should retry later (HTTP 429)."""


class DeviceUnavailable(BgeServeError):
    """The requested device (e.g. cuda:3) does not exist on this machine."""


class CompileFailed(BgeServeError):
    """A compiled graph the settings ask for cannot be built or loaded on this machine (e.g. no C++ compiler)."""


class EmptyInput(InvalidInput):
    """No inputs at all, or an input with no text / no token ids (TEI's `Empty`, HTTP 400)."""


class RequestTimedOut(BgeServeError):
    """A request did not get its outputs within the configured request timeout."""


class NonFiniteOutput(BgeServeError):
    """The model produced NaN or infinity for an input; never handed to the caller as numbers."""


class ShuttingDown(BgeServeError):
    """The engine is stopping and takes no new work (HTTP 503)."""
