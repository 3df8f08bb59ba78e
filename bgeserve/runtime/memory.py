"""The process's memory as the system sees it."""

from __future__ import annotations

import contextlib
import ctypes


def release_freed_memory() -> None:
    """Hands memory freed to glibc's heap back to the system (malloc_trim). glibc keeps freed blocks of
    up to 32 MB in its heap for reuse, and a load that frees GBs of fp32 weights while it allocates their
    replacements leaves much of it there, resident; elsewhere (no glibc) it does nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
