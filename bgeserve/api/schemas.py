"""Request and response bodies of the three route families: OpenAI, TEI and native bge-m3.

Field names and defaults follow the originals (OpenAI's embeddings API, text-embeddings-inference 1.x
and FlagEmbedding's `encode` / `compute_score`), so existing clients work unchanged. Unknown fields
are ignored, as both originals do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

_INPUT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def check_text_or_ids(value: Any) -> Any:
    """Accepts exactly the four input shapes, with one clear message for everything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return value
        if all(_is_id(v) for v in value):
            return value
        if all(isinstance(v, list) and all(_is_id(t) for t in v) for v in value):
            return value
    raise ValueError(f"must be {_INPUT_SHAPES} (not mixed)")


# A text, a batch of texts, one list of token ids, or a batch of token-id lists.
TextOrIds = Annotated[str | list[str] | list[int] | list[list[int]], BeforeValidator(check_text_or_ids)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
TruncationDirection = Literal["right", "left", "Right", "Left"]

def as_input_list(value: TextOrIds) -> list[str | list[int]]:
    """The inputs of a request as a list: one text or one id list becomes a batch of one."""
    if isinstance(value, str):
        return [value]
    if value and all(_is_id(v) for v in value):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- OpenAI ----------------------------------------------------------------------------------------


class OpenAIEmbeddingRequest(_Body):
    """`POST /v1/embeddings`, as OpenAI's API takes it."""

    input: TextOrIds = Field(description=f"{_INPUT_SHAPES}; token ids are used as given")
    model: str | None = Field(None, description="accepted; a name other than the served model is logged")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="keep the first N dimensions and re-normalise")
    user: str | None = None


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


# -- TEI -------------------------------------------------------------------------------------------


class EmbedRequest(_Body):
    """`POST /embed`."""

    inputs: TextOrIds
    normalize: bool = True
    truncate: bool | None = Field(None, description="default: the server's --auto-truncate")
    truncation_direction: TruncationDirection = "right"
    dimensions: int | None = None
    prompt_name: str | None = None


class EmbedAllRequest(_Body):
    """`POST /embed_all` (last hidden state of every token)."""

    inputs: TextOrIds
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "right"
    prompt_name: str | None = None


class EmbedSparseRequest(EmbedAllRequest):
    """`POST /embed_sparse` (bge-m3 lexical weights)."""

    sparse_format: Literal["tei", "indices_values"] = Field(
        "tei",
        description='tei: `[{"index", "value"}]` per input; indices_values: `{"indices": [...], "values": [...]}` '
        "per input, the sparse vector of Qdrant, Milvus and Pinecone",
    )


class SparseValue(BaseModel):
    index: int
    value: float


class SparseVector(BaseModel):
    indices: list[int]
    values: list[float]


class SimilarityInput(_Body):
    source_sentence: str
    sentences: list[str]


class SimilarityParameters(_Body):
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "right"
    prompt_name: str | None = None


class SimilarityRequest(_Body):
    """`POST /similarity`: cosine similarity of `source_sentence` to each of `sentences` (TEI)."""

    inputs: SimilarityInput
    parameters: SimilarityParameters | None = None


class RerankRequest(_Body):
    """`POST /rerank`. bge-m3 has no cross-encoder: scores are its hybrid compute_score."""

    query: str
    texts: list[str]
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "right"
    raw_scores: bool = Field(False, description="accepted for TEI clients; scores are never squashed")
    return_text: bool = False
    weights_for_different_modes: list[FiniteFloat] | None = Field(
        None,
        min_length=3,
        max_length=3,
        description="dense, sparse, colbert weights (default 0.4, 0.2, 0.4; dense only for models "
        "without sparse/ColBERT heads)",
    )
    prompt_name: str | None = None


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None


class TokenizeRequest(_Body):
    """`POST /tokenize`."""

    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class DecodeRequest(_Body):
    """`POST /decode`."""

    ids: list[int] | list[list[int]]
    skip_special_tokens: bool = True


# -- native bge-m3 ---------------------------------------------------------------------------------


class EncodeRequest(_Body):
    """`POST /encode`: FlagEmbedding's `encode()`, every requested output from one forward pass."""

    input: TextOrIds
    return_dense: bool = True
    return_sparse: bool = False
    return_colbert_vecs: bool = False
    max_length: int | None = Field(None, description="token limit, at most the model's")
    truncate: bool | None = None
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: dense_vecs and colbert_vecs as little-endian float32 bytes (row-major)"
    )
    sparse_format: Literal["lexical_weights", "indices_values"] = Field(
        "lexical_weights",
        description='lexical_weights: `{"token_id": weight}` as FlagEmbedding returns it; indices_values: '
        '`{"indices": [...], "values": [...]}` sorted by token id (Qdrant, Milvus, Pinecone sparse vectors)',
    )


class EncodeItem(BaseModel):
    index: int
    dense_vecs: list[float] | str | None = None
    lexical_weights: dict[str, float] | SparseVector | None = None
    colbert_vecs: list[list[float]] | str | None = None


class EncodeResponse(BaseModel):
    data: list[EncodeItem]
    model: str
    usage: Usage


class ScoreRequest(_Body):
    """`POST /score`: FlagEmbedding's `compute_score(pairs, weights_for_different_modes)`."""

    pairs: list[tuple[str, str]] = Field(description="[[query, passage], ...]")
    weights_for_different_modes: list[FiniteFloat] | None = Field(
        None, min_length=3, max_length=3, description="dense, sparse, colbert weights (default 1, 1, 1)"
    )
    max_length: int | None = None
    truncate: bool | None = None


class ScoreResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    colbert: list[float]
    sparse: list[float]
    dense: list[float]
    sparse_dense: list[float] = Field(alias="sparse+dense")
    colbert_sparse_dense: list[float] = Field(alias="colbert+sparse+dense")
