"""`bgeserve encode`: embed a corpus file (or stdin) into JSON lines with FlagEmbedding's keys."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import TextIO

from bgeserve.errors import BgeServeError

EPILOG = """\
input:  one text per line, or JSON lines with a "text" field (e.g. {"id": 7, "text": "..."}).
output: one JSON object per input line, in input order:
        {"index": i, "dense_vecs": [...], "lexical_weights": {"token id": weight}, "colbert_vecs": [[...]]}
        plus the input's "id" when it had one.

examples:
  bgeserve encode < texts.txt > out.jsonl                      # bundled MiniLM, dense only
  bgeserve encode --model /models/bge-m3 --sparse --colbert -i corpus.jsonl -o out.jsonl
  DEVICE=cuda:1 bgeserve encode --model /models/bge-m3 --dtype fp16 -i corpus.txt -o out.jsonl
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `bgeserve encode`."""
    p = sub.add_parser(
        "encode",
        help="embed texts from a file or stdin into JSON lines",
        description="Embed every line of a file (or stdin) and write JSON lines with "
        "FlagEmbedding's output keys. A progress bar goes to stderr.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", "-m", help="checkpoint directory or hub id (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--input", "-i", default="-", help="input file, '-' for stdin (default)")
    p.add_argument("--output", "-o", default="-", help="output file, '-' for stdout (default)")
    p.add_argument("--no-dense", action="store_true", help="leave out dense_vecs")
    p.add_argument("--sparse", action="store_true", help="add lexical_weights (bge-m3 only)")
    p.add_argument("--colbert", action="store_true", help="add colbert_vecs (bge-m3 only)")
    p.add_argument("--max-length", type=int, help="truncate inputs to this many tokens (default: model limit)")
    p.add_argument("--batch-size", type=int, default=256, help="texts per batch at most (default 256)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per batch (default 16384)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: $DEVICE, else auto)")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | fp16 | bf16 | int8 (default auto)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--chunk", type=int, default=4096, help="texts read and written per step (default 4096)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    from bgeserve.ray.commands import add_encode_arguments  # --ray, --input GLOB, --output DIR, ...

    add_encode_arguments(p)
    p.set_defaults(func=run)


def _records(stream: TextIO) -> Iterator[tuple[int, dict]]:
    """Yields (line number, record) for every non-blank line; a record has 'text' and maybe 'id'."""
    for lineno, line in enumerate(stream, start=1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(obj.get("text"), str):
                raise ValueError(f'line {lineno}: a JSON line needs a string "text" field')
            yield lineno, obj
        else:
            yield lineno, {"text": line}


def _chunks(records: Iterator[tuple[int, dict]], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for _, rec in records:
        chunk.append(rec)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run(args: argparse.Namespace) -> int:
    """Encodes the input; returns 0, or 1 with a one-line message on any error."""
    if args.ray:
        from bgeserve.ray.commands import encode_on_ray

        return encode_on_ray(args)
    try:
        return _run(args)
    except (BgeServeError, ValueError, OSError) as exc:
        print(f"bgeserve encode: error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from bgeserve.core import OutputRequest
    from bgeserve.embedder import Embedder

    if args.batch_size < 1 or args.max_batch_tokens < 1 or args.chunk < 1:
        raise ValueError("--batch-size, --max-batch-tokens and --chunk must be positive")
    model = Embedder(
        args.model,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        threads=args.threads,
    )
    want = {"return_dense": not args.no_dense, "return_sparse": args.sparse, "return_colbert_vecs": args.colbert}
    model.check_outputs(OutputRequest(dense=not args.no_dense, sparse=args.sparse, colbert=args.colbert))
    source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    sink = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    index = 0
    try:
        with tqdm(disable=args.no_progress, unit="text", desc="encode", file=sys.stderr) as bar:
            for chunk in _chunks(_records(source), args.chunk):
                out = model.encode([r["text"] for r in chunk], max_length=args.max_length, **want)
                for i, rec in enumerate(chunk):
                    row: dict = {"index": index}
                    if "id" in rec:
                        row["id"] = rec["id"]
                    if out["dense_vecs"] is not None:
                        row["dense_vecs"] = out["dense_vecs"][i].tolist()
                    if out["lexical_weights"] is not None:
                        row["lexical_weights"] = out["lexical_weights"][i]
                    if out["colbert_vecs"] is not None:
                        row["colbert_vecs"] = out["colbert_vecs"][i].tolist()
                    sink.write(json.dumps(row) + "\n")
                    index += 1
                bar.update(len(chunk))
    finally:
        if source is not sys.stdin:
            source.close()
        if sink is not sys.stdout:
            sink.close()
    return 0
