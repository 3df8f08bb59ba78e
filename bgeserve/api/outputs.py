"""Request checks and output formatting shared by the route families (vectors, base64, headers)."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np

from bgeserve.core import ItemOutput, asked
from bgeserve.engine.engine import EncodeResult
from bgeserve.errors import InvalidInput


def check_batch_size(count: int, limit: int, what: str = "inputs", flag: str = "--max-client-batch-size") -> None:
    """Rejects a request with more inputs than the route's limit (`flag` names the setting); `what` names
    the field when it is not the inputs."""
    if count > limit:
        message = f"{count} {what} in one request, more than the limit of {limit} ({flag}); split the request"
        raise InvalidInput(message, None if what == "inputs" else what)


def check_dimensions(dimensions: int | None, hidden_size: int) -> None:
    """`dimensions` must be between 1 and the model's hidden size."""
    if dimensions is not None and not 1 <= dimensions <= hidden_size:
        message = f"dimensions must be between 1 and the model's {hidden_size}, not {dimensions}"
        raise InvalidInput(message, "dimensions")


def check_prompt_name(prompt_name: str | None) -> None:
    """The served models define no prompts, so any prompt_name is unknown (as TEI says)."""
    if prompt_name is not None:
        raise InvalidInput(f"prompt_name {prompt_name!r} is not defined: this model has no prompts")


def dense_matrix(outputs: Sequence[ItemOutput], dimensions: int | None, normalize: bool) -> np.ndarray:
    """Dense vectors as one [n, d] float32 array, cut to `dimensions` and re-normalised if asked."""
    matrix = np.stack(asked([output.dense for output in outputs])).astype(np.float32, copy=False)
    if dimensions is not None and dimensions < matrix.shape[1]:
        matrix = matrix[:, :dimensions]
        if normalize:
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            # Same eps as F.normalize: an all-zero prefix stays zero instead of becoming NaN.
            matrix = matrix / np.maximum(norms, 1e-12)
    return matrix


def to_base64(array: np.ndarray) -> str:
    """Standard base64 of the little-endian float32 bytes, row-major (what OpenAI clients decode)."""
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def timing_headers(result: EncodeResult) -> dict[str, str]:
    """TEI's x-*-time headers (whole milliseconds) plus what was counted and truncated."""
    t = result.timings
    return {
        "x-compute-time": str(int(t.total * 1000)),
        "x-tokenization-time": str(int(t.tokenization * 1000)),
        "x-queue-time": str(int(t.queue * 1000)),
        "x-inference-time": str(int(t.inference * 1000)),
        "x-compute-tokens": str(result.prompt_tokens),
        "x-compute-characters": str(result.characters),
        "x-truncated-inputs": str(result.truncated),
    }


def truncation_direction(value: str) -> str:
    """TEI accepts `Right`/`Left` too."""
    return value.lower()
