"""OpenAI-compatible routes: `POST /v1/embeddings` (also `/embeddings`) and `GET /v1/models`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from bgeserve.api.cancellation import unless_disconnected
from bgeserve.api.outputs import check_batch_size, check_dimensions, dense_matrix, timing_headers, to_base64
from bgeserve.api.schemas import OpenAIEmbeddingRequest, OpenAIEmbeddingResponse, as_input_list
from bgeserve.api.state import ServiceDep
from bgeserve.core import OutputRequest

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse)
@router.post("/embeddings", response_model=OpenAIEmbeddingResponse, include_in_schema=False)
async def create_embeddings(
    body: OpenAIEmbeddingRequest, request: Request, svc: ServiceDep
) -> JSONResponse:
    """Dense embeddings, L2-normalised, as OpenAI returns them (float lists or base64 float32)."""
    inputs = as_input_list(body.input)
    check_batch_size(len(inputs), svc.settings.max_openai_batch_size, flag="--max-openai-batch-size")
    check_dimensions(body.dimensions, svc.engine.hidden_size)
    svc.note_requested_model(body.model)
    result = await unless_disconnected(
        request, svc.engine.encode(inputs, OutputRequest(dense=True), truncate=body.truncate)
    )
    matrix = dense_matrix(result.outputs, body.dimensions, normalize=True)
    if body.encoding_format == "base64":
        vectors: list = [to_base64(row) for row in matrix]
    else:
        vectors = matrix.tolist()
    content = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": svc.model_name,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    return JSONResponse(content, headers=timing_headers(result))


@router.get("/v1/models")
async def list_models(svc: ServiceDep) -> dict:
    """The one served model, in OpenAI's list shape."""
    return {
        "object": "list",
        "data": [{"id": svc.model_name, "object": "model", "created": 0, "owned_by": "bgeserve"}],
    }
