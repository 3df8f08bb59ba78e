"""Where the bench's model comes from: a directory the user gives, or the generated random bge-m3.

The generated checkpoint has bge-m3's real shapes, so it costs what the real model costs (compute
does not depend on the weight values). It is written once into the cache and reused while the
generator and its tokenizer corpus are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from bgeserve.cache_files import build_then_rename, remove_other_keys

_COMPLETE = ".complete"


def default_cache_dir(environ: dict[str, str] | None = None) -> Path:
    """$XDG_CACHE_HOME/bgeserve, else ~/.cache/bgeserve."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bgeserve"


def _generator_digest() -> str:
    """Hash of what decides the generated files: the generator's code and the tokenizer's corpus."""
    from bgeserve.testing import synthetic

    digest = hashlib.sha256(Path(synthetic.__file__).read_bytes())
    digest.update(resources.files("bgeserve").joinpath("data", "mixed.txt").read_bytes())
    return digest.hexdigest()[:12]


def synthetic_checkpoint(
    size: str, cache_dir: Path, seed: int = 0, log: Callable[[str], None] = lambda _m: None
) -> Path:
    """The cached random bge-m3 of `size` ("tiny" or "full"), generated on first use.

    Built aside and renamed in, so an interrupted run never leaves a half checkpoint that a later run
    would trust. Older generations of the same size are removed (2.3 GB each at full).
    """
    from bgeserve.testing.synthetic import SIZES, write_m3_checkpoint

    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; choose one of {sorted(SIZES)}")
    key = _generator_digest()
    folder = Path(cache_dir) / "synthetic" / f"bge-m3-{size}-seed{seed}-{key}"
    if not (folder / _COMPLETE).exists():
        remove_other_keys(folder, key)  # before writing: two full checkpoints may not fit on the disk
        log(f"generating a random {size}-size bge-m3 checkpoint into {folder} (one time)")

        def write(staging: Path) -> None:
            write_m3_checkpoint(staging, size=size, weights="bin", seed=seed)
            (staging / _COMPLETE).write_text("written by bgeserve bench\n", encoding="utf-8")

        build_then_rename(folder, write, _COMPLETE)
    return folder


def stderr_log(message: str) -> None:
    """Progress lines go to stderr so stdout holds only the table."""
    print(message, file=sys.stderr, flush=True)
