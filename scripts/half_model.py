#!/usr/bin/env python3
"""Writes a copy of a Hugging Face model directory whose floating-point weights are stored in fp16.

Why: the lent GPU machine takes at most 64 MiB of files along, and the bundled all-MiniLM-L6-v2 is
88 MB in fp32. Its fp16 copy (44 MB) gives the GPU tests real, trained weights, where fp16/bf16 fidelity is
judged (random checkpoints exaggerate half-precision error). bgeserve upcasts the weights to fp32 when it
loads them, so the copy's fp32 run is exact for the copy, and half precision is measured against it.

    scripts/half_model.py SRC_DIR DEST_DIR

Every file of SRC_DIR is copied, except `model.safetensors`, which is rewritten with fp16 tensors.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

WEIGHTS = "model.safetensors"


def half_copy(src: Path, dest: Path) -> Path:
    """Copies `src` to `dest` (replacing it) with the float tensors of model.safetensors in fp16."""
    from safetensors.torch import load_file, save_file

    if not (src / WEIGHTS).is_file():
        raise FileNotFoundError(f"{src} has no {WEIGHTS} (only safetensors checkpoints are converted)")
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging, ignore=shutil.ignore_patterns(WEIGHTS, "*.bin", "*.onnx*", "bgeserve-onnx"))
    tensors = load_file(str(src / WEIGHTS))
    halved = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(halved, str(staging / WEIGHTS), metadata={"format": "pt"})
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: half_model.py SRC_DIR DEST_DIR", file=sys.stderr)
        return 2
    src, dest = Path(argv[0]), Path(argv[1])
    if not src.is_dir():
        print(f"half_model.py: {src} is not a directory", file=sys.stderr)
        return 2
    try:
        half_copy(src, dest)
    except (FileNotFoundError, OSError) as exc:
        print(f"half_model.py: {exc}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"wrote {dest} ({size / 2**20:.0f} MiB, weights in fp16)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
