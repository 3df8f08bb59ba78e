"""`Embedder`: the Python API, a drop-in for FlagEmbedding's `BGEM3FlagModel` (same names, same outputs)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from bgeserve import scoring
from bgeserve.core import BackendOptions, ItemOutput, OutputRequest, asked
from bgeserve.engine.batching import plan_batches
from bgeserve.errors import InvalidInput
from bgeserve.models.checkpoint import load_checkpoint
from bgeserve.runtime.devices import resolve_device
from bgeserve.runtime.factory import create_backend, use_torch_threads
from bgeserve.sparse import sparse_vector

log = logging.getLogger(__name__)


def _as_text_list(sentences: str | Sequence[str]) -> tuple[list[str], bool]:
    if isinstance(sentences, str):
        return [sentences], True
    if not isinstance(sentences, (list, tuple)):
        raise InvalidInput(f"sentences must be a string or a list of strings, not {type(sentences).__name__}")
    bad = next((i for i, s in enumerate(sentences) if not isinstance(s, str)), None)
    if bad is not None:
        raise InvalidInput(f"sentences[{bad}] is {type(sentences[bad]).__name__}, not a string")
    return list(sentences), False


class Embedder:
    """Loads a model once and encodes texts into dense vectors, lexical weights and ColBERT vectors.

    `Embedder("/models/bge-m3")` runs on `DEVICE` (auto: CUDA when present, else CPU) at dtype auto
    (bf16 on GPUs that have it, else fp16; on CPU bf16 where native and measured faster, else exact fp32).
    With no model it loads
    the bundled all-MiniLM-L6-v2. `backend` is "torch" or "onnx"; `compile` applies torch.compile;
    `cuda_graphs` replays small batches on CUDA from captured graphs; `query_graph` runs a lone text on
    the CPU through a compiled graph of the encoder layers (compiled once, cached on disk).
    FlagEmbedding's constructor arguments (`use_fp16`, `devices`, `query_max_length`, ...) are accepted.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        *,
        model: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        backend: str = "torch",
        compile: bool = False,
        cuda_graphs: bool = False,
        query_graph: bool = False,
        max_length: int | None = None,
        batch_size: int = 256,
        max_batch_tokens: int = 16384,
        threads: int | None = None,
        normalize_embeddings: bool = True,
        use_fp16: bool | None = None,
        devices: str | list[str] | None = None,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        **_ignored: Any,
    ) -> None:
        self.checkpoint = load_checkpoint(model if model is not None else model_name_or_path)
        self.tokenizer = self.checkpoint.tokenizer
        if device is None and devices:
            device = devices if isinstance(devices, str) else devices[0]
        self.device = resolve_device(device or os.environ.get("DEVICE") or "auto")
        if use_fp16 is not None and dtype == "auto":
            # FlagEmbedding runs fp32 on CPU whatever use_fp16 says.
            dtype = "fp16" if use_fp16 and self.device != "cpu" else "fp32"
        options = BackendOptions(
            backend=backend, dtype=dtype, threads=threads, compile=compile, cuda_graphs=cuda_graphs,
            query_graph=query_graph,
        )
        if backend == "torch":
            use_torch_threads(threads)
        # Each backend resolves "auto" itself (torch: runtime.devices.auto_dtype; onnx: fp32).
        self.backend = create_backend(self.checkpoint, self.device, options)
        self.dtype = self.backend.dtype
        self.max_length = min(max_length or self.checkpoint.max_length, self.checkpoint.max_length)
        self.query_max_length = query_max_length or self.max_length
        self.passage_max_length = passage_max_length or self.max_length
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.normalize_embeddings = normalize_embeddings
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.query_instruction_format = query_instruction_format
        self.return_dense, self.return_sparse = return_dense, return_sparse
        self.return_colbert_vecs = return_colbert_vecs
        log.info(
            "model %s on %s (%s), max_length %d", self.checkpoint.name, self.device, self.dtype, self.max_length
        )

    @property
    def model_name(self) -> str:
        return self.checkpoint.name

    @property
    def hidden_size(self) -> int:
        return self.checkpoint.hidden_size

    def embed_ids(
        self,
        ids: list[list[int]],
        want: OutputRequest,
        batch_size: int | None = None,
        show_progress_bar: bool = False,
    ) -> list[ItemOutput]:
        """Runs already-tokenised sequences through the model in token-budgeted batches, input order kept."""
        results: list[ItemOutput | None] = [None] * len(ids)
        batches = plan_batches([len(x) for x in ids], self.max_batch_tokens, batch_size or self.batch_size)
        with tqdm(total=len(ids), disable=not show_progress_bar, unit="text", desc="encode") as bar:
            for batch in batches:
                for index, out in zip(batch, self.backend.run([ids[i] for i in batch], want), strict=True):
                    results[index] = out
                bar.update(len(batch))
        return results  # type: ignore[return-value]

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        show_progress_bar: bool = False,
        sparse_format: str = "lexical_weights",
        **_ignored: Any,
    ) -> dict[str, Any]:
        """FlagEmbedding's `encode`: {"dense_vecs", "lexical_weights", "colbert_vecs"} (None when not asked).

        Inputs longer than max_length (default: the model's limit) are truncated. A single string in
        gives unwrapped values out. `sparse_format="indices_values"` gives each text's lexical weights as
        `{"indices": [...], "values": [...]}` sorted by token id (a Qdrant / Milvus / Pinecone sparse
        vector) instead of FlagEmbedding's `{"token_id": weight}`.
        """
        if sparse_format not in ("lexical_weights", "indices_values"):
            raise InvalidInput(f"sparse_format must be 'lexical_weights' or 'indices_values', not {sparse_format!r}")
        texts, single = _as_text_list(sentences)
        want = OutputRequest(
            dense=self.return_dense if return_dense is None else return_dense,
            sparse=self.return_sparse if return_sparse is None else return_sparse,
            colbert=self.return_colbert_vecs if return_colbert_vecs is None else return_colbert_vecs,
            normalize_dense=self.normalize_embeddings,
        )
        self.check_outputs(want)
        limit = min(max_length or self.max_length, self.checkpoint.max_length)
        ids = self.tokenizer.encode(texts, max_length=limit, truncate=True).ids
        items = self.embed_ids(ids, want, batch_size, show_progress_bar)
        out: dict[str, Any] = {"dense_vecs": None, "lexical_weights": None, "colbert_vecs": None}
        if want.dense:
            dense = asked([it.dense for it in items])
            out["dense_vecs"] = np.stack(dense) if dense else np.zeros((0, self.hidden_size), np.float32)
        if want.sparse:
            weights = [it.lexical_weights or {} for it in items]
            as_vectors = sparse_format == "indices_values"
            out["lexical_weights"] = [sparse_vector(w) for w in weights] if as_vectors else weights
        if want.colbert:
            out["colbert_vecs"] = [it.colbert for it in items]
        if single:
            out = {k: (v[0] if v is not None else None) for k, v in out.items()}
        return out

    def encode_queries(self, queries: str | Sequence[str], max_length: int | None = None, **kwargs: Any):
        """`encode` for queries: adds the query instruction when one was configured."""
        texts, single = _as_text_list(queries)
        if self.query_instruction_for_retrieval:
            texts = [
                self.query_instruction_format.format(self.query_instruction_for_retrieval, t) for t in texts
            ]
        return self.encode(texts[0] if single else texts, max_length=max_length or self.query_max_length, **kwargs)

    def encode_corpus(self, corpus: str | Sequence[str], max_length: int | None = None, **kwargs: Any):
        """`encode` for passages."""
        return self.encode(corpus, max_length=max_length or self.passage_max_length, **kwargs)

    def compute_score(
        self,
        sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
        batch_size: int | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        weights_for_different_modes: Sequence[float] | None = None,
        **_ignored: Any,
    ) -> dict[str, list[float]] | dict[str, float] | list:
        """Dense, sparse, ColBERT and the two weighted hybrids for each (query, passage) pair."""
        if isinstance(sentence_pairs, list) and not sentence_pairs:
            return []
        single = isinstance(sentence_pairs[0], str)
        pairs: list[Any] = [sentence_pairs] if single else list(sentence_pairs)
        if any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in pairs):
            raise InvalidInput("sentence_pairs must be (query, passage) pairs")
        q, p = (
            self.encode([pair[side] for pair in pairs], batch_size, limit, True, True, True)
            for side, limit in ((0, max_query_length or self.query_max_length),
                                (1, max_passage_length or self.passage_max_length))
        )
        scores = scoring.pair_scores(
            dense=(q["dense_vecs"], p["dense_vecs"]),
            lexical=(q["lexical_weights"], p["lexical_weights"]),
            colbert=(q["colbert_vecs"], p["colbert_vecs"]),
            weights=weights_for_different_modes or scoring.DEFAULT_WEIGHTS,
        )
        return {k: v[0] for k, v in scores.items()} if single else scores

    @staticmethod
    def compute_lexical_matching_score(a, b):
        """Sum over shared tokens of the product of their weights (dicts, or lists of dicts -> matrix)."""
        return scoring.compute_lexical_matching_score(a, b)

    @staticmethod
    def colbert_score(q_reps: np.ndarray, p_reps: np.ndarray) -> float:
        """ColBERT late-interaction score of one query and one passage."""
        return scoring.colbert_score(q_reps, p_reps)

    def convert_id_to_token(self, lexical_weights: dict[str, float] | list[dict[str, float]]):
        """Lexical weights keyed by token text instead of id."""
        items = [lexical_weights] if isinstance(lexical_weights, dict) else lexical_weights
        out = [
            {self.tokenizer.decode([int(k)], skip_special_tokens=False): w for k, w in item.items()}
            for item in items
        ]
        return out[0] if len(out) == 1 else out

    def check_outputs(self, want: OutputRequest) -> None:
        """Raises ModelLacksOutput when `want` asks for a head this checkpoint does not have."""
        self.checkpoint.capabilities.require(want, self.checkpoint.name)
