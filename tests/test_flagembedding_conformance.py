"""bgeserve.Embedder against FlagEmbedding's BGEM3FlagModel on the same generated checkpoint (fp32, CPU).

Every comparison is max abs difference <= 1e-5, on both weight layouts (.bin and .safetensors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bgeserve import Embedder

TOL = 1e-5
MAX_LENGTH = 48

TEXTS = [
    "hello",
    "BM25",
    "What is BGE M3?",
    "BM25 is a bag-of-words retrieval function that ranks documents by query terms. " * 6,  # > MAX_LENGTH
    "the the the the cat cat cat sat on the the mat",
    "北京是中国的首都，也是一座历史悠久的城市。自然语言处理。" * 3,
    "مرحبا بالعالم، هذا نص عربي للاختبار",
    "🚀🔥 emoji only 😀😀😀",
    "",
    "literal specials <s> </s> <pad> <unk> <mask> inside a text",
]
CORPUS_FILE = Path(__file__).resolve().parents[1] / "bgeserve" / "data" / "mixed.txt"


@pytest.fixture(scope="module", params=["m3_checkpoint", "m3_checkpoint_safetensors"])
def pair(request):
    from FlagEmbedding import BGEM3FlagModel

    path = str(request.getfixturevalue(request.param))
    flag = BGEM3FlagModel(path, use_fp16=False, devices="cpu", query_max_length=MAX_LENGTH,
                          passage_max_length=MAX_LENGTH)
    ours = Embedder(path, device="cpu", dtype="fp32", max_length=MAX_LENGTH)
    return ours, flag


def _encode_both(ours, flag, texts, **kwargs):
    want = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}
    return ours.encode(texts, **want, **kwargs), flag.encode(texts, max_length=MAX_LENGTH, **want, **kwargs)


def _assert_lexical_equal(a: dict, b: dict):
    assert list(a) == list(b), "same token ids, in the same order"
    diff = max((abs(a[k] - b[k]) for k in a), default=0.0)
    assert diff <= TOL, diff


def test_batch_of_mixed_texts(pair):
    ours, flag = pair
    a, b = _encode_both(ours, flag, TEXTS, batch_size=4)
    assert a["dense_vecs"].shape == b["dense_vecs"].shape and a["dense_vecs"].dtype == np.float32
    assert np.abs(a["dense_vecs"] - b["dense_vecs"]).max() <= TOL
    assert len(a["lexical_weights"]) == len(b["lexical_weights"])
    for x, y in zip(a["lexical_weights"], b["lexical_weights"], strict=True):
        _assert_lexical_equal(x, y)
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"], strict=True):
        assert x.shape == y.shape
        assert np.abs(x - y).max() <= TOL


def test_whole_multilingual_corpus(pair):
    ours, flag = pair
    corpus = CORPUS_FILE.read_text(encoding="utf-8").splitlines()
    a, b = _encode_both(ours, flag, corpus, batch_size=32)
    assert np.abs(a["dense_vecs"] - b["dense_vecs"]).max() <= TOL
    for x, y in zip(a["lexical_weights"], b["lexical_weights"], strict=True):
        _assert_lexical_equal(x, y)
    assert max(np.abs(x - y).max() for x, y in zip(a["colbert_vecs"], b["colbert_vecs"], strict=True)) <= TOL


def test_long_text_is_truncated_like_flagembedding(pair):
    ours, _ = pair
    out = ours.encode(TEXTS[3], return_colbert_vecs=True)
    assert out["colbert_vecs"].shape[0] == MAX_LENGTH - 1  # <s> dropped, </s> kept


def test_single_string_gives_unwrapped_values(pair):
    ours, flag = pair
    a, b = _encode_both(ours, flag, "What is BGE M3?")
    assert a["dense_vecs"].shape == b["dense_vecs"].shape == (ours.hidden_size,)
    assert isinstance(a["lexical_weights"], dict)
    _assert_lexical_equal(a["lexical_weights"], b["lexical_weights"])
    assert np.abs(a["colbert_vecs"] - b["colbert_vecs"]).max() <= TOL


def test_empty_list_gives_empty_result(pair):
    ours, _ = pair
    out = ours.encode([], return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert out["dense_vecs"].shape == (0, ours.hidden_size)
    assert out["lexical_weights"] == [] and out["colbert_vecs"] == []


def test_sparse_as_indices_and_values_holds_flagembeddings_weights(pair):
    ours, flag = pair
    vectors = ours.encode(TEXTS, return_sparse=True, sparse_format="indices_values")["lexical_weights"]
    theirs = flag.encode(TEXTS, max_length=MAX_LENGTH, return_sparse=True)["lexical_weights"]
    for vector, weights in zip(vectors, theirs, strict=True):
        assert vector["indices"] == sorted(int(k) for k in weights)
        expected = [weights[str(i)] for i in vector["indices"]]
        np.testing.assert_allclose(vector["values"], expected, atol=TOL)
    with pytest.raises(ValueError, match="sparse_format"):
        ours.encode(TEXTS, return_sparse=True, sparse_format="tei")


def test_outputs_not_asked_for_are_none(pair):
    ours, _ = pair
    out = ours.encode(["x"])
    assert out["lexical_weights"] is None and out["colbert_vecs"] is None


@pytest.mark.parametrize("weights", [[0.4, 0.2, 0.4], [0.6, 0.3, 0.1]], ids=["symmetric", "each-mode-its-own"])
def test_compute_score_all_modes(pair, weights):
    ours, flag = pair
    pairs = [
        ("What is BGE M3?", "BGE M3 is an embedding model supporting dense, sparse and multi-vector retrieval."),
        ("Defination of BM25", "BM25 is a bag-of-words retrieval function " * 4),
        ("北京", "北京是中国的首都"),
    ]
    a = ours.compute_score(pairs, weights_for_different_modes=weights)
    b = flag.compute_score(pairs, weights_for_different_modes=weights)
    assert set(a) == set(b) == {"colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"}
    for key in a:
        assert np.abs(np.array(a[key]) - np.array(b[key])).max() <= TOL, key
    single = ours.compute_score(pairs[0])
    assert isinstance(single["dense"], float)
    assert abs(single["dense"] - a["dense"][0]) <= TOL


def test_score_helpers_match(pair):
    ours, flag = pair
    q = ours.encode(["What is BGE M3?", "BM25"], return_sparse=True, return_colbert_vecs=True)
    p = ours.encode(["BGE M3 is a model", "BM25 ranks documents"], return_sparse=True,
                    return_colbert_vecs=True)
    lw_ours = ours.compute_lexical_matching_score(q["lexical_weights"][0], p["lexical_weights"][0])
    lw_flag = flag.compute_lexical_matching_score(q["lexical_weights"][0], p["lexical_weights"][0])
    assert abs(lw_ours - lw_flag) <= TOL
    matrix_ours = ours.compute_lexical_matching_score(q["lexical_weights"], p["lexical_weights"])
    matrix_flag = flag.compute_lexical_matching_score(q["lexical_weights"], p["lexical_weights"])
    assert np.abs(matrix_ours - matrix_flag).max() <= TOL
    cb_ours = ours.colbert_score(q["colbert_vecs"][0], p["colbert_vecs"][0])
    cb_flag = float(flag.colbert_score(q["colbert_vecs"][0], p["colbert_vecs"][0]))
    assert abs(cb_ours - cb_flag) <= TOL


def test_queries_corpus_and_token_names(pair):
    ours, flag = pair
    a = ours.encode_queries(["What is BGE M3?"], return_sparse=True)
    b = flag.encode_queries(["What is BGE M3?"], return_sparse=True)
    assert np.abs(a["dense_vecs"] - b["dense_vecs"]).max() <= TOL
    c = ours.encode_corpus(["BM25 ranks documents"])
    d = flag.encode_corpus(["BM25 ranks documents"])
    assert np.abs(c["dense_vecs"] - d["dense_vecs"]).max() <= TOL
    named_ours = ours.convert_id_to_token(a["lexical_weights"])
    named_flag = flag.convert_id_to_token(b["lexical_weights"])
    assert list(named_ours) == list(named_flag)
    assert max(abs(named_ours[k] - named_flag[k]) for k in named_ours) <= TOL
