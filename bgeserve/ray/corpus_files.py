"""The files of a corpus job: which inputs there are, how their rows are read, how outputs are committed.

Each input file gives one output file, `<output>/<same relative path>.parquet`, written under a temporary
name and renamed, so an output that exists is complete. While a file is being embedded its rows go to
part files (`<output>/.bgeserve-parts/<relative path>/`), each named after the rows it holds and written
atomically too; a retried batch rewrites the same part. Once every row of the input is in some part,
`commit` merges the parts (one copy of each row, in input order, ids re-read from the input) into the
output. A killed job leaves parts and no output: the rerun discards those parts and redoes that file.
No Ray import here.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PARTS_DIR = ".bgeserve-parts"
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


class CorpusError(ValueError):
    """An input cannot be read as the job was told to read it (missing column, bad JSON, ...)."""


@dataclass(frozen=True)
class ReadRange:
    """Rows of one file one read task reads: JSON lines between two byte offsets (each at a line start),
    or Parquet row groups [start, stop)."""

    file: int
    first_row: int
    rows: int
    start: int
    stop: int


@dataclass(frozen=True)
class CorpusFile:
    """One input file, the output it gives, its row count and its read ranges."""

    index: int
    path: Path
    output: Path
    parts: Path
    rows: int
    ranges: tuple[ReadRange, ...]

    @property
    def is_parquet(self) -> bool:
        return self.path.suffix.lower() in PARQUET_SUFFIXES


def find_inputs(patterns: str | Sequence[str]) -> list[Path]:
    """Input files matching the glob(s), sorted, each once (`**` recurses)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    found: set[Path] = set()
    for pattern in patterns:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        found.update(Path(m).resolve() for m in matches if Path(m).is_file())
    found = {p for p in found if PARTS_DIR not in p.parts}  # an output directory inside the input glob
    if not found:
        raise CorpusError(f"no input file matches {', '.join(patterns)}")
    unsupported = sorted(str(p) for p in found if p.suffix.lower() not in JSON_SUFFIXES + PARQUET_SUFFIXES)
    if unsupported:
        raise CorpusError(
            f"not JSON lines ({', '.join(JSON_SUFFIXES)}) or Parquet ({', '.join(PARQUET_SUFFIXES)}): "
            + ", ".join(unsupported[:5])
        )
    return sorted(found)


def plan_files(inputs: Sequence[Path], output_dir: Path, text_column: str, rows_per_read: int) -> list[CorpusFile]:
    """One CorpusFile per input, outputs mirroring the inputs' layout below their common directory, each
    split into read ranges of about `rows_per_read` rows (so one big file is read by many tasks)."""
    base = Path(os.path.commonpath([str(p.parent) for p in inputs]))
    planned: list[CorpusFile] = []
    seen: dict[Path, Path] = {}
    for index, path in enumerate(inputs):
        relative = path.relative_to(base).with_suffix(".parquet")
        output = output_dir / relative
        if output in seen:
            raise CorpusError(f"{seen[output]} and {path} would both be written to {output}")
        seen[output] = path
        if path.suffix.lower() in PARQUET_SUFFIXES:
            rows, ranges = _plan_parquet(index, path, text_column, rows_per_read)
        else:
            rows, ranges = _plan_json_lines(index, path, rows_per_read)
        parts = output_dir / PARTS_DIR / relative.with_suffix("")
        planned.append(CorpusFile(index, path, output, parts, rows, tuple(ranges)))
    return planned


def _plan_parquet(index: int, path: Path, text_column: str, rows_per_read: int) -> tuple[int, list[ReadRange]]:
    metadata = pq.ParquetFile(path).metadata
    if text_column not in metadata.schema.names:
        raise CorpusError(f"{path} has no column {text_column!r} (columns: {', '.join(metadata.schema.names)})")
    ranges: list[ReadRange] = []
    first = rows = start = 0
    for group in range(metadata.num_row_groups):
        rows += metadata.row_group(group).num_rows
        if rows - first >= rows_per_read or group == metadata.num_row_groups - 1:
            ranges.append(ReadRange(index, first, rows - first, start, group + 1))
            first, start = rows, group + 1
    return rows, ranges


def _plan_json_lines(index: int, path: Path, rows_per_read: int) -> tuple[int, list[ReadRange]]:
    """Counts the rows (lines that are not blank, split as Python's text files split them) and notes a
    byte offset every `rows_per_read` rows."""
    ranges: list[ReadRange] = []
    rows = first = start = offset = 0
    with path.open("rb") as f:
        for raw in f:
            offset += len(raw)
            rows += sum(1 for line in _text_lines(raw) if line.strip())
            if rows - first >= rows_per_read:
                ranges.append(ReadRange(index, first, rows - first, start, offset))
                first, start = rows, offset
    if rows > first or not ranges:
        ranges.append(ReadRange(index, first, rows - first, start, offset))
    return rows, ranges


def _text_lines(raw: bytes) -> Iterator[str]:
    """Lines as `open(path, encoding="utf-8")` gives them (universal newlines), each without its end."""
    text = raw.decode("utf-8")
    if "\r" in text:
        for line in io.StringIO(text, newline=None):
            yield line.rstrip("\n")
        return
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    yield from lines


def is_complete(file: CorpusFile) -> bool:
    """The output exists (it is only ever renamed into place whole) and has a row per input row."""
    if not file.output.is_file():
        return False
    try:
        return pq.ParquetFile(file.output).metadata.num_rows == file.rows
    except (OSError, pa.ArrowInvalid):
        return False


# -- reading --------------------------------------------------------------------------------------


def read_range(file: CorpusFile, part: ReadRange, text_column: str, block_rows: int) -> Iterator[pa.Table]:
    """Blocks of (`_file`, `_row`, `text`) in file order. A JSON line is an object with the text column;
    a line that is not an object is the text itself (as `bgeserve encode` reads it)."""
    row = part.first_row
    for texts in _text_chunks(file, part, text_column, block_rows):
        yield pa.table({
            "_file": pa.array(np.full(len(texts), file.index, dtype=np.int32)),
            "_row": pa.array(np.arange(row, row + len(texts), dtype=np.int64)),
            "text": pa.array(texts, pa.string()),
        })
        row += len(texts)
    if row != part.first_row + part.rows:
        raise CorpusError(f"{file.path} changed while the job ran: expected {part.rows} rows from row "
                          f"{part.first_row}, read {row - part.first_row}")


def _text_chunks(file: CorpusFile, part: ReadRange, text_column: str, block_rows: int) -> Iterator[list[str]]:
    if file.is_parquet:
        source = pq.ParquetFile(file.path)
        groups = list(range(part.start, part.stop))
        for batch in source.iter_batches(batch_size=block_rows, row_groups=groups, columns=[text_column]):
            texts = batch.column(0).to_pylist()
            bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
            if bad is not None:
                raise CorpusError(f"{file.path}: column {text_column!r} holds {texts[bad]!r}, not a string")
            yield texts
        return
    chunk: list[str] = []
    for where, record in _json_records(file.path, part):
        text = record.get(text_column) if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise CorpusError(f"{file.path} {where}: a JSON object needs a string {text_column!r} field")
        chunk.append(text)
        if len(chunk) >= block_rows:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _json_records(path: Path, part: ReadRange) -> Iterator[tuple[str, dict | str]]:
    """(where, record) for every non-blank line of the range; `where` names the line for errors (its
    number in the first range, its row in later ones, whose first line number is not known)."""
    with path.open("rb") as f:
        f.seek(part.start)
        data = f.read(part.stop - part.start)
    row = part.first_row
    for number, line in enumerate(_text_lines(data), start=1):
        if not line.strip():
            continue
        where = f"line {number}" if part.start == 0 else f"row {row}"
        row += 1
        if line.lstrip().startswith("{"):
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path} {where}: invalid JSON ({exc.msg})") from exc
        else:
            yield where, line


def read_ids(file: CorpusFile, id_column: str | None) -> pa.Array:
    """The id of every row in order: the id column (its type kept), or the row number without one."""
    if id_column:
        if file.is_parquet:
            if id_column in pq.read_schema(file.path).names:
                return pq.read_table(file.path, columns=[id_column]).column(0).combine_chunks()
        else:
            ids = [r.get(id_column) if isinstance(r, dict) else None
                   for part in file.ranges for _, r in _json_records(file.path, part)]
            given = [i for i in ids if i is not None]
            if given:
                # One type per column: integer ids stay integers; any other id makes them all text.
                if all(isinstance(i, int) and not isinstance(i, bool) for i in given):
                    return pa.array(ids, pa.int64())
                return pa.array([i if i is None or isinstance(i, str) else json.dumps(i) for i in ids], pa.string())
    return pa.array(np.arange(file.rows, dtype=np.int64))


# -- parts and commit -----------------------------------------------------------------------------


def write_part(parts_dir: Path, table: pa.Table) -> Path:
    """Writes one batch's rows of one file, named after those rows, under a temporary name then renamed:
    a retried batch lands on the same name, and a part that exists is whole."""
    rows = table.column("_row").to_numpy()
    digest = hashlib.blake2b(np.sort(rows).tobytes(), digest_size=8).hexdigest()
    parts_dir.mkdir(parents=True, exist_ok=True)
    final = parts_dir / f"{int(rows.min()):012d}-{digest}.parquet"
    temporary = parts_dir / f".{final.name}.{uuid.uuid4().hex}.tmp"
    pq.write_table(table, temporary)
    os.replace(temporary, final)
    return final


def commit(file: CorpusFile, id_column: str | None) -> int:
    """Merges the file's parts into its output (atomically) and removes them; returns the rows written.
    Raises CorpusError when the parts do not hold every row."""
    parts = sorted(file.parts.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None
    if table is None:
        raise CorpusError(f"{file.path}: no embedded rows were written")
    rows = table.column("_row").to_numpy()
    # A row embedded twice (a batch retried after a failure, re-bundled) is kept once.
    unique_rows, first = np.unique(rows, return_index=True)
    if len(unique_rows) != file.rows or (file.rows and (unique_rows[0] != 0 or unique_rows[-1] != file.rows - 1)):
        raise CorpusError(f"{file.path}: {len(unique_rows)} of {file.rows} rows were embedded")
    table = table.take(pa.array(first))  # np.unique sorts: this is input order
    ids = read_ids(file, id_column)
    columns = {"id": ids}
    for name in table.column_names:
        if not name.startswith("_"):
            columns[name] = table.column(name)
    out = pa.table(columns)
    file.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = file.output.with_name(f".{file.output.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(out, temporary)
    os.replace(temporary, file.output)
    shutil.rmtree(file.parts, ignore_errors=True)
    return out.num_rows


def discard_parts(file: CorpusFile) -> None:
    """Removes what a killed run left of this file, so no row can be written twice."""
    shutil.rmtree(file.parts, ignore_errors=True)
