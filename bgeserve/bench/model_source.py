"""Where the bench's model comes from: a directory the user gives, or the generated random bge-m3.

The generated checkpoint has bge-m3's real shapes, so it costs what the real model costs (compute
does not depend on the weight values). It is written once into the cache and reused while the
generator and its tokenizer corpus are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from importlib import resources
from pathlib import Path

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


def synthetic_checkpoint(size: str, cache_dir: Path, seed: int = 0, log=lambda _m: None) -> Path:
    """The cached random bge-m3 of `size` ("tiny" or "full"), generated on first use.

    Written to a temporary sibling and renamed, so an interrupted run never leaves a half checkpoint
    that a later run would trust. Older generations of the same size are removed (2.3 GB each at full).
    """
    from bgeserve.testing.synthetic import SIZES, write_m3_checkpoint

    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; choose one of {sorted(SIZES)}")
    root = Path(cache_dir) / "synthetic"
    stem = f"bge-m3-{size}-seed{seed}-"
    folder = root / f"{stem}{_generator_digest()}"
    if (folder / _COMPLETE).exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{stem}*"):
        if stale != folder and stale.is_dir():
            log(f"removing an older generated checkpoint: {stale}")
            shutil.rmtree(stale, ignore_errors=True)
    partial = root / f".{folder.name}.partial-{os.getpid()}"
    log(f"generating a random {size}-size bge-m3 checkpoint into {folder} (one time)")
    try:
        write_m3_checkpoint(partial, size=size, weights="bin", seed=seed)
        (partial / _COMPLETE).write_text("written by bgeserve bench\n", encoding="utf-8")
        if folder.exists():  # another run got there first: keep theirs
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def stderr_log(message: str) -> None:
    """Progress lines go to stderr so stdout holds only the table."""
    print(message, file=sys.stderr, flush=True)
