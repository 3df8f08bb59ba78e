"""qdrant-client hybrid search (dense + sparse, fused by RRF) fed straight from one `POST /encode` call."""

from __future__ import annotations

import numpy as np


def test_hybrid_search_from_one_encode_call(m3):
    url = m3.url

    # --- README snippet ----------------------------------------------------------------------------
    import httpx
    from qdrant_client import QdrantClient, models

    def encode(texts):
        body = {"input": texts, "return_dense": True, "return_sparse": True, "sparse_format": "indices_values"}
        return httpx.post(f"{url}/encode", json=body, timeout=60).raise_for_status().json()["data"]

    docs = [
        "BM25 is a bag-of-words retrieval function",
        "BGE M3 gives dense, sparse and multi-vector outputs",
        "Paris is the capital of France",
    ]
    items = encode(docs)
    size = len(items[0]["dense_vecs"])
    client = QdrantClient(":memory:")
    client.create_collection(
        "docs",
        vectors_config={"dense": models.VectorParams(size=size, distance=models.Distance.COSINE)},
        sparse_vectors_config={"sparse": models.SparseVectorParams()},
    )
    client.upsert("docs", [
        models.PointStruct(
            id=i,
            vector={"dense": item["dense_vecs"], "sparse": models.SparseVector(**item["lexical_weights"])},
            payload={"text": text},
        )
        for i, (text, item) in enumerate(zip(docs, items, strict=True))
    ])

    def search(query):
        q = encode([query])[0]
        return client.query_points(
            "docs",
            prefetch=[
                models.Prefetch(query=q["dense_vecs"], using="dense", limit=10),
                models.Prefetch(query=models.SparseVector(**q["lexical_weights"]), using="sparse", limit=10),
            ],
            query=models.FusionQuery(fusion=models.Fusion.RRF),
            limit=3,
        ).points
    # --- end of snippet ----------------------------------------------------------------------------

    for text in docs:
        assert search(text)[0].payload["text"] == text
    assert np.allclose([item["dense_vecs"] for item in items], m3.embed(docs), atol=1e-6)
    weights = m3.post("/embed_sparse", {"inputs": docs}).json()
    for item, per_doc in zip(items, weights, strict=True):
        pairs = dict(zip(item["lexical_weights"]["indices"], item["lexical_weights"]["values"], strict=True))
        assert sorted(pairs) == [w["index"] for w in per_doc]
        assert np.allclose([pairs[w["index"]] for w in per_doc], [w["value"] for w in per_doc], atol=1e-6)
