"""text-embeddings-inference compatible routes: same paths, fields, defaults and error shape as TEI 1.x."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from bgeserve import __version__
from bgeserve.api.cancellation import unless_disconnected
from bgeserve.api.errors import ErrorKind, error_response, json_body, validated
from bgeserve.api.outputs import (
    check_batch_size,
    check_dimensions,
    check_prompt_name,
    dense_matrix,
    timing_headers,
    truncation_direction,
)
from bgeserve.api.schemas import (
    DecodeRequest,
    EmbedAllRequest,
    EmbedRequest,
    EmbedSparseRequest,
    Rank,
    RerankRequest,
    SimilarityParameters,
    SimilarityRequest,
    SparseValue,
    SparseVector,
    TokenizeRequest,
    as_input_list,
)
from bgeserve.api.scores import check_weights, dense_scores, hybrid_scores
from bgeserve.api.state import ServiceDep
from bgeserve.core import PRECISION_NAMES, OutputRequest, SimpleToken
from bgeserve.errors import EmptyInput
from bgeserve.sparse import sparse_vector, tei_sparse_values

router = APIRouter(tags=["TEI"])
health_router = APIRouter(tags=["TEI"])

# FlagEmbedding's suggested hybrid weights for ranking (dense, sparse, colbert).
DEFAULT_RERANK_WEIGHTS = (0.4, 0.2, 0.4)


async def _encode_inputs(body, request: Request, svc: ServiceDep, want: OutputRequest):
    """The common part of /embed, /embed_sparse and /embed_all: validate, encode, stop if the client left."""
    inputs = as_input_list(body.inputs)
    check_batch_size(len(inputs), svc.settings.max_client_batch_size)
    check_prompt_name(body.prompt_name)
    return await unless_disconnected(
        request,
        svc.engine.encode(
            inputs, want, truncate=body.truncate, direction=truncation_direction(body.truncation_direction)
        ),
    )


@router.post("/embed", response_model=list[list[float]])
async def embed(body: EmbedRequest, request: Request, svc: ServiceDep) -> JSONResponse:
    """Dense embeddings, one list per input (normalised unless `normalize` is false)."""
    check_dimensions(body.dimensions, svc.engine.hidden_size)
    result = await _encode_inputs(body, request, svc, OutputRequest(dense=True, normalize_dense=body.normalize))
    matrix = dense_matrix(result.outputs, body.dimensions, normalize=body.normalize)
    return JSONResponse(matrix.tolist(), headers=timing_headers(result))


@router.post("/embed_sparse", response_model=list[list[SparseValue]] | list[SparseVector])
async def embed_sparse(
    body: EmbedSparseRequest, request: Request, svc: ServiceDep
) -> JSONResponse:
    """bge-m3 lexical weights per input as `[{"index": token_id, "value": weight}]`, sorted by index.

    With `sparse_format: "indices_values"`, one `{"indices": [...], "values": [...]}` per input instead.
    """
    result = await _encode_inputs(body, request, svc, OutputRequest(dense=False, sparse=True))
    shape = sparse_vector if body.sparse_format == "indices_values" else tei_sparse_values
    content = [shape(output.lexical_weights or {}) for output in result.outputs]
    return JSONResponse(content, headers=timing_headers(result))


@router.post("/embed_all", response_model=list[list[list[float]]])
async def embed_all(body: EmbedAllRequest, request: Request, svc: ServiceDep) -> JSONResponse:
    """The last hidden state of every token (special tokens included), per input."""
    result = await _encode_inputs(body, request, svc, OutputRequest(dense=False, token_embeddings=True))
    content = [output.token_embeddings.tolist() for output in result.outputs]
    return JSONResponse(content, headers=timing_headers(result))


@router.post("/rerank", response_model=list[Rank])
async def rerank(body: RerankRequest, request: Request, svc: ServiceDep) -> JSONResponse:
    """Ranks `texts` against `query`, best first.

    bge-m3 has no cross-encoder, so the score is its hybrid `compute_score` of one forward pass per
    text: `colbert+sparse+dense` with weights 0.4/0.2/0.4 unless `weights_for_different_modes` says
    otherwise. A model without sparse/ColBERT heads ranks by dense cosine similarity only.
    """
    if not body.texts:
        raise EmptyInput("`texts` cannot be empty")
    check_batch_size(len(body.texts), svc.settings.max_client_batch_size, what="texts")
    check_prompt_name(body.prompt_name)
    check_weights(body.weights_for_different_modes)
    caps = svc.engine.capabilities
    want = OutputRequest(dense=True, sparse=caps.sparse, colbert=caps.colbert)
    result = await unless_disconnected(
        request,
        svc.engine.encode(
            [body.query, *body.texts],
            want,
            truncate=body.truncate,
            direction=truncation_direction(body.truncation_direction),
        ),
    )
    query, *docs = result.outputs
    queries = [query] * len(docs)
    if caps.sparse and caps.colbert:
        weights = body.weights_for_different_modes or DEFAULT_RERANK_WEIGHTS
        scores = hybrid_scores(queries, docs, weights)["colbert+sparse+dense"]
    else:
        scores = dense_scores(queries, docs)
    order = sorted(range(len(docs)), key=lambda i: -scores[i])
    content = []
    for i in order:
        rank: dict = {"index": i, "score": scores[i]}
        if body.return_text:
            rank["text"] = body.texts[i]
        content.append(rank)
    return JSONResponse(content, headers=timing_headers(result))


@router.post("/similarity", response_model=list[float])
async def similarity(body: SimilarityRequest, request: Request, svc: ServiceDep) -> JSONResponse:
    """Cosine similarity of `inputs.source_sentence` to each of `inputs.sentences`, in order (TEI)."""
    sentences = body.inputs.sentences
    if not sentences:
        raise EmptyInput("`inputs.sentences` cannot be empty")
    # The source sentence counts towards the batch, as in TEI.
    check_batch_size(len(sentences) + 1, svc.settings.max_client_batch_size)
    parameters = body.parameters or SimilarityParameters()
    check_prompt_name(parameters.prompt_name)
    result = await unless_disconnected(
        request,
        svc.engine.encode(
            [body.inputs.source_sentence, *sentences],
            OutputRequest(dense=True),
            truncate=parameters.truncate,
            direction=truncation_direction(parameters.truncation_direction),
        ),
    )
    source, *others = result.outputs
    return JSONResponse(dense_scores([source] * len(others), others), headers=timing_headers(result))


@router.post(
    "/",
    response_model=list[list[float]] | list[float],
    summary="Embed or similarity (TEI's route to the model's task)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"oneOf": [
                {"$ref": "#/components/schemas/EmbedRequest"},
                {"$ref": "#/components/schemas/SimilarityRequest"},
            ]}}},
        }
    },
)
@router.post("/invocations", include_in_schema=False)  # SageMaker's name for the same route
async def task(request: Request, svc: ServiceDep) -> JSONResponse:
    """`/embed` for an embed body, `/similarity` for a body whose `inputs` is an object.

    huggingface_hub's `InferenceClient(model=URL)` posts both `feature_extraction` and
    `sentence_similarity` here; TEI itself serves one of them per process (its TASK variable).
    """
    payload = await json_body(request)
    if isinstance(payload, dict) and isinstance(payload.get("inputs"), dict):
        return await similarity(validated(SimilarityRequest, payload), request, svc)
    return await embed(validated(EmbedRequest, payload), request, svc)


@router.post("/tokenize", response_model=list[list[SimpleToken]])
async def tokenize(body: TokenizeRequest, request: Request, svc: ServiceDep) -> JSONResponse:
    """Tokens with ids, text, special flag and character offsets, one list per input.

    An input over the model's limit is cut (or refused with `truncate: false`) as the embedding routes
    do, so the tokens are exactly what they would embed and an answer holds at most the limit per input.
    """
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    check_batch_size(len(texts), svc.settings.max_client_batch_size)
    check_prompt_name(body.prompt_name)
    results = await unless_disconnected(
        request,
        svc.engine.tokenize(
            texts,
            body.add_special_tokens,
            truncate=body.truncate,
            direction=truncation_direction(body.truncation_direction),
        ),
    )
    content = [[vars(token) for token in result.tokens] for result in results]
    truncated = sum(result.truncated for result in results)
    return JSONResponse(content, headers={"x-truncated-inputs": str(truncated)})


@router.post("/decode", response_model=list[str])
async def decode(body: DecodeRequest, request: Request, svc: ServiceDep) -> JSONResponse:
    """Token ids back to text, one string per id list."""
    single = bool(body.ids) and all(isinstance(x, int) for x in body.ids)
    sequences = [body.ids] if single else body.ids
    check_batch_size(len(sequences), svc.settings.max_client_batch_size)
    texts = await unless_disconnected(request, svc.engine.decode(sequences, body.skip_special_tokens))  # type: ignore[arg-type]
    return JSONResponse(texts)


@router.get("/info")
async def info(svc: ServiceDep) -> dict:
    """TEI's /info fields, plus what bge-m3 clients need (hidden size, outputs, replicas)."""
    engine, settings = svc.engine, svc.settings
    caps = engine.capabilities
    return {
        "model_id": svc.model_name,
        "model_sha": None,
        "model_dtype": PRECISION_NAMES.get(engine.dtype, engine.dtype),
        "model_type": {"embedding": {"pooling": engine.pooling}},
        "max_concurrent_requests": settings.max_concurrent_requests,
        "max_input_length": engine.max_length,
        "max_batch_tokens": engine.max_batch_tokens,
        "max_batch_requests": settings.max_batch_requests,
        "max_client_batch_size": settings.max_client_batch_size,
        "auto_truncate": settings.auto_truncate,
        "tokenization_workers": settings.tokenization_workers,
        "version": __version__,
        "sha": None,
        "docker_label": None,
        "hidden_size": engine.hidden_size,
        "outputs": {"dense": caps.dense, "sparse": caps.sparse, "colbert": caps.colbert},
        "devices": engine.devices,
    }


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(svc: ServiceDep) -> Response:
    """Prometheus text exposition (see `bgeserve.api.metrics` for the names)."""
    return Response(svc.metrics.render(), media_type=svc.metrics.content_type)


@health_router.get("/health")
@health_router.get("/", summary="Health (TEI's root route)")
@health_router.get("/ping", summary="Health (SageMaker's route)")
# Load-balancer probes use HEAD; the schema leaves it implicit.
@health_router.head("/health", include_in_schema=False)
@health_router.head("/", include_in_schema=False)
@health_router.head("/ping", include_in_schema=False)
async def health(request: Request, svc: ServiceDep) -> Response:
    """200 while every replica is serving, 503 otherwise. Needs no API key."""
    if svc.engine.healthy:
        return JSONResponse({"status": "ok"})
    unhealthy = ErrorKind(503, "server_error", "unavailable", "Unhealthy")
    return error_response(request.url.path, "the model replicas are not running", unhealthy)
