"""Throughput of one model at several token budgets per forward pass (the `--max-batch-tokens` default).

    .venv/bin/python scripts/token_budget_sweep.py --model DIR --corpus passages.txt --texts 48

Each budget: a fresh Embedder, one warm-up call, then `--passes` timed encodes of the same texts; the
best pass is printed. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bgeserve import Embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--corpus", required=True, help="one text per line")
    parser.add_argument("--texts", type=int, default=48, help="texts spread evenly over the corpus")
    parser.add_argument("--budgets", default="1024,4096,16384", help="comma list of token budgets")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()
    lines = [line.strip() for line in Path(args.corpus).read_text(encoding="utf-8").splitlines() if line.strip()]
    count = min(args.texts, len(lines))
    texts = [lines[round(i * (len(lines) - 1) / max(1, count - 1))] for i in range(count)]
    for budget in (int(b) for b in args.budgets.split(",")):
        model = Embedder(args.model, device=args.device, dtype=args.dtype, max_length=512, max_batch_tokens=budget)
        model.encode(texts[:4])
        best = float("inf")
        for _ in range(args.passes):
            start = time.perf_counter()
            model.encode(texts)
            best = min(best, time.perf_counter() - start)
        tokens = sum(len(ids) for ids in model.tokenizer.encode(texts, max_length=512).ids)
        print(f"budget {budget}: {count / best:.2f} texts/s, {tokens / best:.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
