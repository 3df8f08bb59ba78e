"""Request and response bodies of the three route families: OpenAI, TEI and native bge-m3.

Field names and defaults follow the originals (OpenAI's embeddings API, text-embeddings-inference 1.x
and FlagEmbedding's `encode` / `compute_score`), so existing clients work unchanged. Unknown fields
are ignored, as both originals do. Types are strict: `"16"`, `true` or `16.5` for an integer, `"yes"`
or `1` for a boolean are refused, not converted (`16.0` is the integer 16: JSON has one number type).

The JSON schemas (OpenAPI) describe what the server accepts, checks made in code included (non-empty
texts and lists, batch sizes, id and dimension ranges); limits that depend on the served model and the
settings are named with `LIMIT` and filled in by `bgeserve.api.openapi`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

_INPUT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"

# Schema key naming a served limit (`{"maxItems": "batch"}`); see bgeserve.api.openapi.
LIMIT = "x-bgeserve-limit"


def _integral(value: Any) -> Any:
    """16.0 is the integer 16, as JSON Schema's "integer" has it; 16.5, "16" and true stay what they are."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def check_text_or_ids(value: Any) -> Any:
    """Accepts exactly the four input shapes, with one clear message for everything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        value = [[_integral(t) for t in v] if isinstance(v, list) else _integral(v) for v in value]
        if all(isinstance(v, str) for v in value):
            return value
        if all(_is_id(v) for v in value):
            return value
        if all(isinstance(v, list) and all(_is_id(t) for t in v) for v in value):
            return value
    raise ValueError(f"must be {_INPUT_SHAPES} (not mixed)")


_TEXT: dict[str, Any] = {"type": "string", "minLength": 1}


def _texts(batch: str, item: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "array", "items": item or _TEXT, "minItems": 1, LIMIT: {"maxItems": batch}}


def _ids(min_items: int = 1) -> dict[str, Any]:
    token = {"type": "integer", "minimum": 0, LIMIT: {"maximum": "vocab_max"}}
    return {"type": "array", "items": token, "minItems": min_items}


def _inputs_schema(batch: str) -> dict[str, Any]:
    return {
        "anyOf": [_TEXT, _texts(batch), _ids(), _texts(batch, _ids())],
        "description": f"{_INPUT_SHAPES}; token ids must be this model's (from /tokenize: its special "
        "tokens first and last)",
    }


def _optional(schema: dict[str, Any]) -> Any:
    return WithJsonSchema({"anyOf": [schema, {"type": "null"}]})


# An integer field: strict, but written 16 or 16.0 alike.
JsonInt = Annotated[int, BeforeValidator(_integral)]
_TextOrIdsType = str | list[str] | list[int] | list[list[int]]
# A text, a batch of texts, one list of token ids, or a batch of token-id lists.
TextOrIds = Annotated[_TextOrIdsType, BeforeValidator(check_text_or_ids), WithJsonSchema(_inputs_schema("batch"))]
OpenAITextOrIds = Annotated[
    _TextOrIdsType, BeforeValidator(check_text_or_ids), WithJsonSchema(_inputs_schema("openai_batch"))
]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
TruncationDirection = Literal["right", "left", "Right", "Left"]
# The served models define no prompts: any name is refused, so the schema allows null only.
PromptName = Annotated[str | None, WithJsonSchema({"type": "null", "description": "must be null or left out"})]
Dimensions = Annotated[JsonInt | None, _optional({"type": "integer", "minimum": 1, LIMIT: {"maximum": "hidden_size"}})]
MaxLength = Annotated[
    JsonInt | None,
    _optional({"type": "integer", LIMIT: {"minimum": "min_length", "maximum": "max_length"}}),
]
# dense, sparse, colbert: not negative, and dense + sparse above zero (the weighted means divide by them).
Weights = Annotated[
    list[FiniteFloat] | None,
    Field(min_length=3, max_length=3),
    _optional({
        "type": "array",
        "items": {"type": "number", "minimum": 0},
        "minItems": 3,
        "maxItems": 3,
        "anyOf": [{"prefixItems": [{"exclusiveMinimum": 0}]}, {"prefixItems": [{}, {"exclusiveMinimum": 0}]}],
    }),
]


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
    model_config = ConfigDict(extra="ignore", strict=True)


def _non_empty(**kwargs: Any) -> Any:
    """A text field the code refuses when empty (400 Empty), documented with minLength 1."""
    return Field(json_schema_extra={"minLength": 1}, **kwargs)


# -- errors ----------------------------------------------------------------------------------------


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIError(BaseModel):
    """Error body of the OpenAI and native routes."""

    error: OpenAIErrorDetail


class TEIError(BaseModel):
    """Error body of the TEI routes."""

    error: str
    error_type: str


# -- OpenAI ----------------------------------------------------------------------------------------


class OpenAIEmbeddingRequest(_Body):
    """`POST /v1/embeddings`, as OpenAI's API takes it."""

    input: OpenAITextOrIds
    model: str | None = Field(None, description="accepted; a name other than the served model is logged")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Dimensions = Field(None, description="keep the first N dimensions and re-normalise")
    user: str | None = None
    truncate: bool | None = Field(
        None, description="cut inputs over the model's limit (default: the server's --auto-truncate); "
        "false: refuse them"
    )


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
    dimensions: Dimensions = None
    prompt_name: PromptName = None


class EmbedAllRequest(_Body):
    """`POST /embed_all` (last hidden state of every token)."""

    inputs: TextOrIds
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "right"
    prompt_name: PromptName = None


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
    source_sentence: str = _non_empty()
    # The source sentence counts towards the batch.
    sentences: list[str] = Field(json_schema_extra=_texts("batch_less_one"))


class SimilarityParameters(_Body):
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "right"
    prompt_name: PromptName = None


class SimilarityRequest(_Body):
    """`POST /similarity`: cosine similarity of `source_sentence` to each of `sentences` (TEI)."""

    inputs: SimilarityInput
    parameters: SimilarityParameters | None = None


class RerankRequest(_Body):
    """`POST /rerank`. bge-m3 has no cross-encoder: scores are its hybrid compute_score."""

    query: str = _non_empty()
    texts: list[str] = Field(json_schema_extra=_texts("batch"))
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "right"
    raw_scores: bool = Field(False, description="accepted for TEI clients; scores are never squashed")
    return_text: bool = False
    weights_for_different_modes: Weights = Field(
        None,
        description="dense, sparse, colbert weights (default 0.4, 0.2, 0.4; dense only for models "
        "without sparse/ColBERT heads)",
    )
    prompt_name: PromptName = None


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None


class TokenizeRequest(_Body):
    """`POST /tokenize`: inputs over the model's limit are cut as the embedding routes cut them."""

    inputs: Annotated[str | list[str], WithJsonSchema({"anyOf": [_TEXT, _texts("batch")]})]
    add_special_tokens: bool = True
    truncate: bool | None = Field(None, description="default: the server's --auto-truncate; false: refuse "
                                  "inputs over the model's limit")
    truncation_direction: TruncationDirection = "right"
    prompt_name: PromptName = None


class DecodeRequest(_Body):
    """`POST /decode`."""

    ids: Annotated[
        list[JsonInt] | list[list[JsonInt]], WithJsonSchema({"anyOf": [_ids(), _texts("batch", _ids(min_items=0))]})
    ]
    skip_special_tokens: bool = True


# -- native bge-m3 ---------------------------------------------------------------------------------


class EncodeRequest(_Body):
    """`POST /encode`: FlagEmbedding's `encode()`, every requested output from one forward pass."""

    # At least one output must be asked for.
    model_config = ConfigDict(json_schema_extra={"not": {
        "required": ["return_dense"],
        "properties": {name: {"const": False} for name in ("return_dense", "return_sparse", "return_colbert_vecs")},
    }})

    input: TextOrIds
    return_dense: bool = True
    return_sparse: bool = False
    return_colbert_vecs: bool = False
    max_length: MaxLength = Field(None, description="token limit, at most the model's")
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

    pairs: list[Annotated[list[str], Field(min_length=2, max_length=2)]] = Field(
        description="[[query, passage], ...]",
        json_schema_extra=_texts("batch", {"type": "array", "items": _TEXT, "minItems": 2, "maxItems": 2}),
    )
    weights_for_different_modes: Weights = Field(None, description="dense, sparse, colbert weights (default 1, 1, 1)")
    max_length: MaxLength = None
    truncate: bool | None = None


class ScoreResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    colbert: list[float]
    sparse: list[float]
    dense: list[float]
    sparse_dense: list[float] = Field(alias="sparse+dense")
    colbert_sparse_dense: list[float] = Field(alias="colbert+sparse+dense")
