"""The corpus job's file layer without Ray: the rows read are the texts `bgeserve encode` reads, split into
ranges at any size; parts merge into one copy of each row in input order; incomplete parts never commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bgeserve.cli.encode import _records
from bgeserve.ray.corpus_files import (
    CorpusError,
    commit,
    find_inputs,
    is_complete,
    plan_files,
    read_range,
    write_part,
)


def _jsonl(path: Path) -> Path:
    lines = [
        json.dumps({"id": "a", "text": "first"}),
        "",
        "   ",
        "\u3000",  # only an ideographic space: blank to Python's str.strip, as to `bgeserve encode`
        "a plain line\r",  # CRLF
        json.dumps({"id": 7, "text": "日本語"}),
        "lone\rreturn",  # a lone CR ends a line in text mode too
        json.dumps({"text": "no id"}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return path


def _read_all(file, text_column="text", block_rows=2) -> list[tuple[int, str]]:
    rows = []
    for part in file.ranges:
        for block in read_range(file, part, text_column, block_rows):
            rows += list(zip(block.column("_row").to_pylist(), block.column("text").to_pylist(), strict=True))
    return rows


@pytest.mark.parametrize("rows_per_read", [1, 2, 3, 100])
def test_json_lines_give_the_texts_bgeserve_encode_reads(tmp_path, rows_per_read):
    path = _jsonl(tmp_path / "in.jsonl")
    with path.open(encoding="utf-8") as f:
        expected = [record["text"] for _, record in _records(f)]
    (file,) = plan_files([path], tmp_path / "out", "text", rows_per_read)
    assert file.rows == len(expected) == 6
    assert sum(r.rows for r in file.ranges) == file.rows
    assert _read_all(file) == list(enumerate(expected))


def test_parquet_ranges_follow_row_groups(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(10)), "text": [f"t{i}" for i in range(10)]}), path, row_group_size=3)
    (file,) = plan_files([path], tmp_path / "out", "text", 4)
    assert [(r.first_row, r.rows) for r in file.ranges] == [(0, 6), (6, 4)]
    assert _read_all(file) == [(i, f"t{i}") for i in range(10)]
    with pytest.raises(CorpusError, match="no column 'body'"):
        plan_files([path], tmp_path / "out", "body", 4)


def test_outputs_mirror_the_input_tree_and_collisions_are_refused(tmp_path):
    (tmp_path / "x").mkdir()
    for name in ("a.jsonl", "x/b.jsonl"):
        (tmp_path / name).write_text('{"text": "t"}\n')
    files = plan_files(find_inputs(str(tmp_path / "**" / "*.jsonl")), tmp_path / "out", "text", 10)
    assert [f.output.relative_to(tmp_path / "out").as_posix() for f in files] == ["a.parquet", "x/b.parquet"]
    (tmp_path / "a.parquet").write_bytes(b"")
    with pytest.raises(CorpusError, match="would both be written"):
        plan_files([tmp_path / "a.jsonl", tmp_path / "a.parquet"], tmp_path / "out", "text", 10)
    with pytest.raises(CorpusError, match="no input file"):
        find_inputs(str(tmp_path / "*.none"))


def _part(rows, value):
    dense = pa.FixedSizeListArray.from_arrays(pa.array(np.full(len(rows) * 2, value, np.float32)), 2)
    return pa.table({"_row": pa.array(rows, pa.int64()), "dense": dense})


def test_commit_keeps_one_copy_of_each_row_in_input_order(tmp_path):
    path = _jsonl(tmp_path / "in.jsonl")
    (file,) = plan_files([path], tmp_path / "out", "text", 100)
    write_part(file.parts, _part([5, 3, 1], 1.0))
    write_part(file.parts, _part([0, 2, 4], 2.0))
    write_part(file.parts, _part([3, 4], 3.0))  # a retried, re-bundled batch: rows already there
    write_part(file.parts, _part([5, 3, 1], 1.0))  # the same batch again lands on the same part
    assert len(list(file.parts.glob("*.parquet"))) == 3
    assert not is_complete(file)
    assert commit(file, "id") == 6
    table = pq.read_table(file.output)
    assert table.column("id").to_pylist() == ["a", None, "7", None, None, None]  # mixed ids: text
    assert [row[0] for row in table.column("dense").to_pylist()] == [2.0, 1.0, 2.0, 1.0, 2.0, 1.0]
    assert is_complete(file) and not file.parts.exists()


def test_missing_rows_never_commit(tmp_path):
    path = _jsonl(tmp_path / "in.jsonl")
    (file,) = plan_files([path], tmp_path / "out", "text", 100)
    write_part(file.parts, _part([0, 1, 2, 4, 5], 1.0))
    with pytest.raises(CorpusError, match="5 of 6 rows"):
        commit(file, "id")
    assert not file.output.exists()
