"""qdrant-client hybrid search (dense + sparse, fused by RRF) fed straight from one `POST /encode` call.

The code is the README's example itself, run as it stands there, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    """The python block that follows the `qdrant-hybrid-example` marker in the README."""
    found = re.search(r"<!-- qdrant-hybrid-example -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert found, "the README lost its qdrant example"
    return found.group(1)


def test_the_readme_hybrid_search_runs_from_one_encode_call(m3, capsys):
    scope: dict = {"url": m3.url}
    exec(compile(readme_example(), "README.md:qdrant-hybrid-example", "exec"), scope)
    docs, items, search = scope["docs"], scope["items"], scope["search"]
    assert "BM25" in capsys.readouterr().out
    for text in docs:
        assert search(text)[0].payload["text"] == text
    # One call gave both outputs, equal to what the dense and sparse routes give on their own.
    assert np.allclose([item["dense_vecs"] for item in items], m3.embed(docs), atol=1e-6)
    weights = m3.post("/embed_sparse", {"inputs": docs}).json()
    for item, per_doc in zip(items, weights, strict=True):
        pairs = dict(zip(item["lexical_weights"]["indices"], item["lexical_weights"]["values"], strict=True))
        assert sorted(pairs) == [w["index"] for w in per_doc]
        assert np.allclose([pairs[w["index"]] for w in per_doc], [w["value"] for w in per_doc], atol=1e-6)
