"""The `bgeserve` command: one sub-command per area, each registered by its own module."""

from __future__ import annotations

import argparse
import sys

from bgeserve import __version__
from bgeserve.cli.bench import register as register_bench
from bgeserve.cli.encode import register as register_encode
from bgeserve.cli.ops import register as register_ops
from bgeserve.cli.serve import register as register_serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bgeserve",
        description="Embedding service and tools for BAAI/bge-m3 (dense, sparse, ColBERT) "
        "and BERT-family sentence-transformers models.",
    )
    parser.add_argument("--version", action="version", version=f"bgeserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_encode(sub)
    register_serve(sub)
    register_bench(sub)
    register_ops(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
