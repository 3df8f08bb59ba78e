"""Native bge-m3 routes with FlagEmbedding's names: `POST /encode` and `POST /score`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from bgeserve.api.cancellation import unless_disconnected
from bgeserve.api.outputs import check_batch_size, timing_headers, to_base64
from bgeserve.api.schemas import EncodeRequest, EncodeResponse, ScoreRequest, ScoreResponse, as_input_list
from bgeserve.api.scores import check_weights, hybrid_scores
from bgeserve.api.state import ServiceDep
from bgeserve.core import OutputRequest
from bgeserve.errors import InvalidInput
from bgeserve.scoring import DEFAULT_WEIGHTS
from bgeserve.sparse import sparse_vector

router = APIRouter(tags=["native bge-m3"])


@router.post("/encode", response_model=EncodeResponse, response_model_exclude_none=True)
async def encode(body: EncodeRequest, request: Request, svc: ServiceDep) -> JSONResponse:
    """Any of dense_vecs, lexical_weights and colbert_vecs, all from one forward pass per input."""
    if not (body.return_dense or body.return_sparse or body.return_colbert_vecs):
        raise InvalidInput("nothing to return: set return_dense, return_sparse or return_colbert_vecs", "return_dense")
    inputs = as_input_list(body.input)
    check_batch_size(len(inputs), svc.settings.max_client_batch_size)
    want = OutputRequest(dense=body.return_dense, sparse=body.return_sparse, colbert=body.return_colbert_vecs)
    result = await unless_disconnected(
        request, svc.engine.encode(inputs, want, truncate=body.truncate, max_length=body.max_length)
    )
    as_base64 = body.encoding_format == "base64"
    data = []
    for index, output in enumerate(result.outputs):
        item: dict = {"index": index}
        if body.return_dense:
            assert output.dense is not None  # asked for, so computed
            item["dense_vecs"] = to_base64(output.dense) if as_base64 else output.dense.tolist()
        if body.return_sparse:
            weights = output.lexical_weights or {}
            if body.sparse_format == "indices_values":
                item["lexical_weights"] = sparse_vector(weights)
            else:
                item["lexical_weights"] = {k: float(v) for k, v in weights.items()}
        if body.return_colbert_vecs:
            assert output.colbert is not None
            item["colbert_vecs"] = to_base64(output.colbert) if as_base64 else output.colbert.tolist()
        data.append(item)
    content = {
        "data": data,
        "model": svc.model_name,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    return JSONResponse(content, headers=timing_headers(result))


@router.post("/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, request: Request, svc: ServiceDep) -> JSONResponse:
    """FlagEmbedding's compute_score: dense, sparse, colbert and the two weighted combinations.

    Needs a model with sparse and ColBERT heads (bge-m3); each distinct text is encoded once.
    """
    if not body.pairs:
        raise InvalidInput("`pairs` cannot be empty", "pairs")
    check_batch_size(len(body.pairs), svc.settings.max_client_batch_size, what="pairs")
    check_weights(body.weights_for_different_modes)
    want = OutputRequest(dense=True, sparse=True, colbert=True)
    svc.engine.check_outputs(want)
    texts = list(dict.fromkeys(text for pair in body.pairs for text in pair))
    result = await unless_disconnected(
        request, svc.engine.encode(texts, want, truncate=body.truncate, max_length=body.max_length)
    )
    by_text = dict(zip(texts, result.outputs, strict=True))
    queries = [by_text[q] for q, _ in body.pairs]
    passages = [by_text[p] for _, p in body.pairs]
    weights = body.weights_for_different_modes or list(DEFAULT_WEIGHTS)
    return JSONResponse(hybrid_scores(queries, passages, weights), headers=timing_headers(result))
