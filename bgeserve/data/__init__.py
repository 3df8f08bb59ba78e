"""The bundled multilingual sample, `mixed.txt`: short and long lines in many scripts, emoji and fuzz lines.

It trains the generated checkpoints' tokenizer, calibrates int8, and is the default bench corpus and the
tests' corpus.
"""

from __future__ import annotations

from importlib import resources


def sample_texts() -> list[str]:
    """The non-empty lines of mixed.txt, in file order."""
    text = resources.files(__name__).joinpath("mixed.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]
