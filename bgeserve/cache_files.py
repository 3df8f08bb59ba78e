"""Derived files cached on disk (ONNX exports, compiled query graphs, generated checkpoints, peer exports).

Two rules for all of them: a cache entry is keyed by its sources' name, size and mtime (hashing
gigabytes of weights on every start would cost more than the check saves), and it is built in a
staging directory beside its place and renamed in, so no reader ever sees a half-written entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def stamp_key(files: Iterable[Path], parts: Iterable[str] = (), length: int = 20) -> str:
    """A hex key that changes when any of `parts` (versions, options) or any file's name, size or mtime does."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() + b"\0")
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:length]


def model_cache_entry(model_dir: Path, model_name: str, subdir: str, fallback: Path, name: str,
                      cache_dir: Path | None = None) -> Path:
    """Where a model's derived file set `name` lives: under an explicit `cache_dir`, else in `model_dir/subdir`
    when that is writable (and not inside an installed package), else under `fallback`. The entries outside
    the model directory are prefixed with the model's name."""
    if cache_dir is not None:
        return Path(cache_dir) / f"{_safe(model_name)}-{name}"
    beside = model_dir / subdir
    # A model shipped inside a Python package (the bundled MiniLM) is not ours to write into.
    installed = any(part in ("site-packages", "dist-packages") for part in model_dir.parts)
    if not installed and _writable_dir(beside):
        return beside / name
    return fallback / f"{_safe(model_name)}-{name}"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "model"


@contextlib.contextmanager
def exclusive_build(target: Path) -> Iterator[None]:
    """Holds an exclusive lock on `target`'s build while the block runs: a process (or thread) that would
    build the same entry waits, then finds it built, instead of building it a second time beside the
    first (a compile that takes a minute and gigabytes of memory). The lock is an flock on a small file
    beside the entry, released when the holder exits, even by a crash; the file itself stays."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_then_rename(target: Path, build: Callable[[Path], object], done: str) -> Path:
    """`target`, built by `build(staging_dir)` and renamed into place unless it is there already.

    `done` names the file inside `target` that proves an entry complete. When two processes build at
    once the first rename wins and the other's staging copy is dropped. A failed build leaves nothing, and
    a `target` left without `done` (a removal cut short) is replaced.
    """
    if (target / done).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        _share(staging)
        try:
            staging.rename(target)
        except OSError:
            if (target / done).exists():
                log.info("another process built %s first; using it", target)
            else:
                _discard(target)
                staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _share(staging: Path) -> None:
    """mkdtemp makes the directory private; a cache entry gets the modes the user's umask gives new files.
    Links are left alone (chmod would follow them out of the cache)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [staging, *staging.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _discard(target: Path) -> None:
    """Moves an incomplete `target` aside (one rename, so a reader never sees it half removed), then deletes it."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=target.parent))
    target.rename(aside / target.name)
    shutil.rmtree(aside, ignore_errors=True)


def remove_other_keys(target: Path, key: str) -> None:
    """Removes the siblings of `target` whose names differ from it only in `key` (older builds of the same
    entry: bge-m3's exports are 2.3 GB each). A process still reading one keeps its open files."""
    for stale in target.parent.glob(target.name.replace(key, "?" * len(key))):
        if stale != target and stale.is_dir():
            log.info("removing an older cache entry: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
