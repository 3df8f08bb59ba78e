"""`run_corpus_job`: embed JSON-lines / Parquet files into Parquet on a Ray cluster with Ray Data.

    read (one task per `block_rows` rows of a file, rows numbered) -> tokenise (CPU tasks; each block
    sorted by length, so the model's batches are dense) -> embed (`map_batches` with an actor pool: one
    model per actor, `concurrency` actors, `num_gpus` each; each actor writes its rows as part files)
    -> merge (a task per file, started by the driver once every row of the file is in).

Only row numbers and token counts travel back to the driver; vectors go from the actor that made
them straight to the output directory, which every node must see (a shared filesystem). Outputs are
those of `bgeserve encode` on the same texts: the same tokenisation, the same `Embedder`, rows in input
order. Resume and duplicate-free output: see `bgeserve.ray.corpus_files`.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from bgeserve.core import ItemOutput, OutputRequest, asked
from bgeserve.ray.corpus_files import (
    CorpusError,
    CorpusFile,
    commit,
    discard_parts,
    find_inputs,
    is_complete,
    plan_files,
    read_range,
    write_part,
)

log = logging.getLogger("bgeserve.ray.corpus")

PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class CorpusJobOptions:
    """Everything a corpus job runs with (the Python keywords and `bgeserve encode --ray` flags)."""

    model: str | None = None  # checkpoint directory or hub id; None: the bundled MiniLM
    text_column: str = "text"
    id_column: str | None = "id"  # missing from a file (or None): ids are the row numbers
    dense: bool = True
    sparse: bool = False
    colbert: bool = False  # big: one vector per token
    max_length: int | None = None  # tokens per text (default: the model's limit)
    dtype: str = "auto"
    backend: str = "torch"
    concurrency: int | tuple[int, int] = 1  # embedding actors (a fixed count, or (min, max) to autoscale)
    num_gpus: float = 0.0  # per actor; > 0 puts the model on the GPU Ray gives it
    num_cpus: float = 1.0  # CPUs Ray reserves per actor
    threads: int | None = None  # torch threads of a CPU actor (default: num_cpus, at least 1)
    tokenize_num_cpus: float = 1.0  # per tokenisation task
    batch_size: int = 256  # rows per actor call (and texts per forward pass at most)
    max_batch_tokens: int = 16384  # padded tokens per forward pass, as `bgeserve encode --max-batch-tokens`
    # Rows per read task, and so per block, tokenisation task (the length-sorting window) and actor task:
    # the unit of progress, and what a dead actor redoes. Default: 4 x batch_size.
    block_rows: int | None = None
    progress: bool = True

    @property
    def rows_per_block(self) -> int:
        """`block_rows`, or its default of 4 x batch_size."""
        return 4 * self.batch_size if self.block_rows is None else self.block_rows

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_batch_tokens", "block_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        if not (self.dense or self.sparse or self.colbert):
            raise ValueError("ask for at least one output: dense, sparse or colbert")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, not {self.threads}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, not {self.max_length}")
        low, high = self.concurrency if isinstance(self.concurrency, tuple) else (self.concurrency,) * 2
        if low < 1 or high < low:
            raise ValueError(f"concurrency must be N >= 1 or (min, max) with 1 <= min <= max, not {self.concurrency}")

    @property
    def want(self) -> OutputRequest:
        return OutputRequest(dense=self.dense, sparse=self.sparse, colbert=self.colbert)


@dataclass(frozen=True)
class CorpusJobSummary:
    """What a run did."""

    files: int  # input files embedded by this run
    files_skipped: int  # complete from an earlier run
    rows: int
    tokens: int
    seconds: float
    outputs: list[Path] = field(default_factory=list)
    startup_seconds: float = 0.0  # until the first embedded rows came back (Ray Data start, model loads)
    first_batch_rows: int = 0

    @property
    def steady_rows_per_second(self) -> float:
        """Rows per second once the first rows were back (start-up left out)."""
        seconds = self.seconds - self.startup_seconds
        return (self.rows - self.first_batch_rows) / seconds if seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{self.rows} rows, {self.tokens} tokens from {self.files} files ({self.files_skipped} already "
            f"complete) in {self.seconds:.1f} s ({self.startup_seconds:.1f} s to the first rows): "
            f"{self.rows_per_second:.1f} rows/s, {self.tokens_per_second:.0f} tokens/s"
        )


def run_corpus_job(
    input_glob: str | Sequence[str],
    output_dir: str | Path,
    *,
    text_column: str = "text",
    id_column: str | None = "id",
    sparse: bool = False,
    colbert: bool = False,
    **options: Any,
) -> CorpusJobSummary:
    """Embeds every file matching `input_glob` into `output_dir/<name>.parquet` (columns `id`, `dense`,
    `sparse_indices` / `sparse_values` with `sparse`, `colbert` with `colbert`); files whose output is
    complete are skipped. Other keywords: the fields of `CorpusJobOptions`. Uses the Ray cluster this
    process is connected to (Ray Data starts a local one when it is not)."""
    job = CorpusJobOptions(text_column=text_column, id_column=id_column, sparse=sparse, colbert=colbert, **options)
    return CorpusJob(job).run(input_glob, Path(output_dir))


class CorpusJob:
    """One run of the pipeline over the input files."""

    def __init__(self, options: CorpusJobOptions) -> None:
        self.options = options

    def run(self, input_glob: str | Sequence[str], output_dir: Path) -> CorpusJobSummary:
        from bgeserve.models.checkpoint import load_checkpoint

        started = time.monotonic()
        opts = self.options
        checkpoint = load_checkpoint(opts.model)
        checkpoint.capabilities.require(opts.want, checkpoint.name)  # fail before any Ray work
        if opts.max_length is not None and opts.max_length < checkpoint.tokenizer.shortest_input:
            raise ValueError(f"max_length must be at least {checkpoint.tokenizer.shortest_input} for this model "
                             f"(its special tokens and one more), not {opts.max_length}")
        files = plan_files(find_inputs(input_glob), output_dir.resolve(), opts.text_column, opts.rows_per_block)
        pending = [f for f in files if not is_complete(f)]
        skipped = len(files) - len(pending)
        for file in pending:
            discard_parts(file)  # what a killed run left: never merged, so no row is written twice
        if skipped:
            log.info("%d of %d files are complete from an earlier run: skipped", skipped, len(files))
        rows = tokens = first_rows = 0
        first_at = started
        if pending:
            rows, tokens, first_at, first_rows = self._embed(pending, str(checkpoint.path), checkpoint.hidden_size)
        summary = CorpusJobSummary(
            files=len(pending), files_skipped=skipped, rows=rows, tokens=tokens,
            seconds=time.monotonic() - started, outputs=[f.output for f in files],
            startup_seconds=first_at - started, first_batch_rows=first_rows,
        )
        log.info("corpus job done: %s", summary)
        return summary

    def _embed(self, files: list[CorpusFile], model: str, hidden: int) -> tuple[int, int, float, int]:
        """Runs the pipeline over `files`, committing each as soon as all its rows are in; returns rows,
        tokens, and when the first rows came back and how many."""
        opts = self.options
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = opts.progress
        by_index = {f.index: f for f in files}
        seen = {f.index: np.zeros(f.rows, dtype=bool) for f in files}
        # A file's merge is a task anywhere in the cluster (no CPU reserved: it must not wait for the
        # actors to finish), so merging spreads over the nodes and a finished file is final at once.
        merge = ray.remote(num_cpus=0, max_retries=3)(commit)
        committing: dict[int, ray.ObjectRef] = {}
        rows = tokens = first_rows = 0
        first_at = None
        # Empty inputs have nothing to embed: commit them now (outputs with the columns and no rows).
        for file in files:
            if file.rows == 0:
                write_part(file.parts, part_table(np.zeros(0, np.int64), [], opts.want, hidden))
                committing[file.index] = merge.remote(file, opts.id_column)
        progress = _Progress(sum(f.rows for f in files), len(files), opts.progress)
        for batch in self._dataset(files, model).iter_batches(batch_size=None, batch_format="numpy"):
            if first_at is None:
                first_at, first_rows = time.monotonic(), len(batch["_row"])
            for index in np.unique(batch["_file"]):
                mask = batch["_file"] == index
                covered = seen[int(index)]
                new = ~covered[batch["_row"][mask]]
                rows += int(new.sum())
                tokens += int(batch["num_tokens"][mask][new].sum())
                covered[batch["_row"][mask]] = True
                if covered.all() and int(index) not in committing:
                    committing[int(index)] = merge.remote(by_index[int(index)], opts.id_column)
            done, _ = ray.wait(list(committing.values()), num_returns=len(committing), timeout=0)
            progress.update(rows, tokens, len(done))
        ray.get(list(committing.values()))  # a merge's error fails the job here
        missing = [str(f.path) for f in files if f.index not in committing]
        if missing:
            raise CorpusError(f"the pipeline ended before every row of {', '.join(missing)} was embedded")
        progress.update(rows, tokens, len(files), final=True)
        return rows, tokens, first_at or time.monotonic(), first_rows

    def _dataset(self, files: list[CorpusFile], model: str) -> ray.data.Dataset:
        opts = self.options
        low, high = opts.concurrency if isinstance(opts.concurrency, tuple) else (opts.concurrency,) * 2
        pool = ray.data.ActorPoolStrategy(size=low) if low == high else ray.data.ActorPoolStrategy(
            min_size=low, max_size=high
        )
        source = CorpusSource(files, opts.text_column, opts.rows_per_block)
        return (
            ray.data.read_datasource(source, override_num_blocks=source.tasks, num_cpus=opts.tokenize_num_cpus)
            .map_batches(
                tokenize, batch_size=opts.rows_per_block, fn_kwargs={"model": model, "max_length": opts.max_length},
                num_cpus=opts.tokenize_num_cpus, udf_modifying_row_count=False,
            )
            .map_batches(
                CorpusEmbedder,
                batch_size=opts.batch_size,
                batch_format="pyarrow",
                compute=pool,
                num_cpus=opts.num_cpus,
                num_gpus=opts.num_gpus or None,
                fn_constructor_kwargs={"options": opts, "model": model,
                                       "parts": {f.index: str(f.parts) for f in files}},
                udf_modifying_row_count=False,
            )
        )


# -- pipeline stages (run in Ray workers) ---------------------------------------------------------


class CorpusSource(Datasource):
    """Read stage: one read task per read range (`block_rows` rows) of each file, rows numbered in file
    order. Ray Data keeps a task's output as one block, so a range is also one tokenisation task and
    one actor task downstream."""

    def __init__(self, files: list[CorpusFile], text_column: str, block_rows: int) -> None:
        super().__init__()
        self.files, self.text_column, self.block_rows = files, text_column, block_rows

    @property
    def tasks(self) -> int:
        return sum(len(f.ranges) for f in self.files)

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(f.path.stat().st_size for f in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        # One task per range whatever `parallelism` says: the ranges are what the rows are numbered by.
        return [
            ReadTask(
                functools.partial(read_range, file, part, self.text_column, self.block_rows),
                BlockMetadata(num_rows=part.rows, size_bytes=None, exec_stats=None, input_files=(str(file.path),)),
            )
            for file in self.files
            for part in file.ranges
        ]


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str, max_length: int | None):
    """One tokenizer per worker process and model (tokenisation tasks reuse their process)."""
    from bgeserve.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(model)
    # The limit `Embedder.encode` uses, so the ids are those `bgeserve encode` embeds.
    return checkpoint.tokenizer, min(max_length or checkpoint.max_length, checkpoint.max_length)


def tokenize(batch: dict[str, np.ndarray], model: str, max_length: int | None) -> pa.Table:
    """Tokenise stage: ids with special tokens, cut to the limit, the batch sorted by length so each
    actor call gets texts of about one length (dense batches)."""
    tokenizer, limit = _tokenizer(model, max_length)
    ids = tokenizer.encode([str(t) for t in batch["text"]], limit, truncate=True).ids
    order = np.argsort(np.array([len(x) for x in ids], dtype=np.int64), kind="stable")
    return pa.table({
        "_file": pa.array(batch["_file"][order], pa.int32()),
        "_row": pa.array(batch["_row"][order], pa.int64()),
        "input_ids": pa.array([ids[i] for i in order], pa.list_(pa.int32())),
    })


class CorpusEmbedder:
    """Embed stage, one per actor: loads the model once, embeds each batch with the token-budget
    planning of `Embedder`, writes the rows as part files, and hands back only row numbers."""

    def __init__(self, options: CorpusJobOptions, model: str, parts: dict[int, str]) -> None:
        from bgeserve.embedder import Embedder

        on_gpu = options.num_gpus > 0
        self.embedder = Embedder(
            model,
            device="cuda:0" if on_gpu else "cpu",  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
            dtype=options.dtype,
            backend=options.backend,
            threads=None if on_gpu else options.threads or max(1, int(options.num_cpus)),
            batch_size=options.batch_size,
            max_batch_tokens=options.max_batch_tokens,
        )
        self.want = OutputRequest(
            dense=options.dense, sparse=options.sparse, colbert=options.colbert,
            normalize_dense=self.embedder.normalize_embeddings,
        )
        self.parts = {index: Path(path) for index, path in parts.items()}

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        ids = batch.column("input_ids").to_pylist()
        outputs = self.embedder.embed_ids(ids, self.want)
        files = batch.column("_file").to_numpy()
        rows = batch.column("_row").to_numpy()
        for index in np.unique(files):
            where = np.nonzero(files == index)[0]
            table = part_table(rows[where], [outputs[i] for i in where], self.want, self.embedder.hidden_size)
            write_part(self.parts[int(index)], table)
        return {"_file": files, "_row": rows, "num_tokens": np.array([o.num_tokens for o in outputs], np.int64)}


def part_table(rows: np.ndarray, outputs: list[ItemOutput], want: OutputRequest, hidden: int) -> pa.Table:
    """Rows as the output stores them: `dense` a fixed-size float32 list, `sparse_indices` /
    `sparse_values` sorted by token id, `colbert` a list of fixed-size float32 vectors."""
    from bgeserve.sparse import sorted_weights

    columns: dict[str, pa.Array] = {"_row": pa.array(rows, pa.int64())}
    if want.dense:
        vectors = asked([o.dense for o in outputs])
        flat = np.stack(vectors).astype(np.float32).ravel() if vectors else np.zeros(0, np.float32)
        columns["dense"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), hidden)
    if want.sparse:
        pairs = [sorted_weights(o.lexical_weights or {}) for o in outputs]
        columns["sparse_indices"] = pa.array([[i for i, _ in p] for p in pairs], pa.list_(pa.int32()))
        columns["sparse_values"] = pa.array([[v for _, v in p] for p in pairs], pa.list_(pa.float32()))
    if want.colbert:
        vectors = [np.asarray(o.colbert, dtype=np.float32) for o in outputs]
        width = vectors[0].shape[1] if vectors else hidden
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in vectors])]).astype(np.int32)
        flat = np.concatenate([v.ravel() for v in vectors]) if vectors else np.zeros(0, np.float32)
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)
        columns["colbert"] = pa.ListArray.from_arrays(pa.array(offsets), tokens)
    return pa.table(columns)


class _Progress:
    """A rows-per-second line on stderr every PROGRESS_EVERY_S seconds (beside Ray Data's bars)."""

    def __init__(self, total_rows: int, total_files: int, enabled: bool) -> None:
        self.total_rows, self.total_files, self.enabled = total_rows, total_files, enabled
        self.started = self.last = time.monotonic()

    def update(self, rows: int, tokens: int, files_done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < PROGRESS_EVERY_S):
            return
        self.last = now
        seconds = max(now - self.started, 1e-9)
        print(
            f"bgeserve encode --ray: {rows}/{self.total_rows} rows, {files_done}/{self.total_files} files, "
            f"{rows / seconds:.1f} rows/s, {tokens / seconds:.0f} tokens/s",
            file=sys.stderr, flush=True,
        )
