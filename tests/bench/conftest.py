"""Fixtures for the bench tests: a tiny bge-m3 checkpoint and a small corpus file."""

from __future__ import annotations

from pathlib import Path

import pytest

# No special-token look-alikes here: the corpus is about timing, fidelity must come out exact.
TEXTS = [
    "What is BGE M3?",
    "BM25 is a bag-of-words retrieval function that ranks documents by the query terms in each one.",
    "北京是中国的首都，也是一座历史悠久的城市。",
    "Dense, sparse and multi-vector retrieval in one model.",
    "The quick brown fox jumps over the lazy dog.",
    "مرحبا بالعالم، هذا نص عربي للاختبار",
    "Retrieval-augmented generation grounds answers in documents found by a search index.",
    "short",
    "Le modèle prend en charge plus de cent langues et des textes de huit mille jetons.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
]


@pytest.fixture(scope="session")
def tiny_m3(request, tmp_path_factory) -> Path:
    """The shared tiny checkpoint when tests/conftest.py provides it, else one written here."""
    try:
        return Path(request.getfixturevalue("m3_checkpoint"))
    except pytest.FixtureLookupError:
        from bgeserve.testing.synthetic import write_m3_checkpoint

        return write_m3_checkpoint(tmp_path_factory.mktemp("bench-m3") / "tiny", size="tiny")


@pytest.fixture(scope="session")
def bench_texts() -> list[str]:
    return list(TEXTS)


@pytest.fixture()
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
    return path
