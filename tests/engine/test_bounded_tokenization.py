"""A long text is tokenised only as far as its limit needs, with the very tokens whole-text tokenisation gives.

Every case compares the windowed answer (`TextTokenizer.body` / `encode` / `tokenize_detailed`) with
tokenising the whole text and then cutting, on both tokenizer families the service ships: MiniLM's
WordPiece (BERT pre-tokenizer) and bge-m3's XLM-R Unigram (Metaspace; cut inside long CJK runs too).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from bgeserve.data import sample_texts
from bgeserve.errors import InputTooLong
from bgeserve.models.tokenizer import TextTokenizer, _first_window

MIXED = (Path(__file__).parents[2] / "bgeserve" / "data" / "mixed.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module", params=["minilm", "m3"])
def tokenizer(request, minilm_tokenizer_dir, m3_checkpoint) -> TextTokenizer:
    return TextTokenizer.from_dir(minilm_tokenizer_dir if request.param == "minilm" else m3_checkpoint)


def _long_texts() -> dict[str, str]:
    rng = random.Random(13)
    lines = sample_texts()
    han = "".join(ch for ch in MIXED if "\u4e00" <= ch <= "\u9fff" or ch in "，。")
    return {
        "corpus": MIXED * 3,  # English, code, CJK, Arabic, emoji, fuzz lines
        "shuffled": " ".join(rng.sample(lines, len(lines))) * 2,
        "no_whitespace": "".join(MIXED.split()) * 2,  # one "word" for XLM-R: cut inside it
        "han_run": han * 30,
        "odd_spacing": "".join(rng.choice(lines) + rng.choice(["", " ", "\n", "  ", "\t"]) for _ in range(1500)),
        "one_long_word": "ab" * 20_000,  # no cut point at all: tokenised whole, still exact
        # Unigram splits a run of one letter by the run's length: no cut inside it is safe.
        "letter_run": "a" * 5001,
        "letter_run_after_words": "see the run " * 20 + "a" * 5002,
    }


LONG_TEXTS = _long_texts()


@pytest.mark.parametrize("name", list(LONG_TEXTS))
@pytest.mark.parametrize("direction", ["right", "left"])
@pytest.mark.parametrize("limit", [8, 130, 512])
def test_windowed_tokens_are_the_whole_texts_tokens_cut(tokenizer, name, direction, limit):
    text = LONG_TEXTS[name]
    budget = limit - tokenizer.num_special_tokens
    whole = tokenizer._tok.encode(text, add_special_tokens=False)
    want = whole.ids[:budget] if direction == "right" else whole.ids[-budget:]
    want_offsets = whole.offsets[:budget] if direction == "right" else whole.offsets[-budget:]

    body = tokenizer.body(text, budget, direction)

    assert body.encoding.ids == want
    assert [(a + body.offset, b + body.offset) for a, b in body.encoding.offsets] == list(want_offsets)
    assert body.cut == (len(whole.ids) > budget)
    # With specials, as embedding gets them: the same as transformers-style truncation of the whole text.
    encoded = tokenizer.encode([text], limit, direction=direction)
    assert encoded.ids[0] == tokenizer._tok.post_process(body.encoding).ids
    assert len(encoded.ids[0]) == min(limit, len(whole.ids) + tokenizer.num_special_tokens)


@pytest.mark.parametrize("direction", ["right", "left"])
def test_a_word_over_wordpieces_limit_is_never_cut_at_the_window_edge(minilm_tokenizer_dir, direction):
    # WordPiece makes one [UNK] of a word over 100 characters, but pieces of the part a window shows:
    # a window must not end (or start) inside such a word and keep its pieces.
    tokenizer = TextTokenizer.from_dir(minilm_tokenizer_dir)
    words = "yesterday " * 99  # 99 tokens, 990 characters: the first window (1024) holds them all
    budget = len(tokenizer._tok.encode(words, add_special_tokens=False).ids) + 1
    size = _first_window(budget)
    long_word = "x" * 150
    if direction == "right":
        text = words[: size - 40] + " " + long_word + " and more" * 100  # the window shows 39 of its x's
    else:
        text = "before " * 100 + long_word + " " + words[: size - 41]
    whole = tokenizer._tok.encode(text, add_special_tokens=False).ids
    body = tokenizer.body(text, budget, direction)
    assert body.encoding.ids == (whole[:budget] if direction == "right" else whole[-budget:])


def test_a_huge_text_costs_a_window_not_the_whole_text(tokenizer):
    text = (MIXED * 100)[:1_000_000]
    started = time.perf_counter()
    body = tokenizer.body(text, 510, "right")
    windowed = time.perf_counter() - started
    started = time.perf_counter()
    whole = tokenizer._tok.encode(text, add_special_tokens=False)
    full = time.perf_counter() - started
    assert body.encoding.ids == whole.ids[:510]
    assert body.full_length is None  # never counted: only a window was tokenised
    assert windowed < full / 10, (windowed, full)


def test_a_long_cjk_run_is_cut_inside_by_the_unigram_model(m3_checkpoint):
    tokenizer = TextTokenizer.from_dir(m3_checkpoint)
    text = LONG_TEXTS["han_run"] * 10  # ~45k characters, not one space
    body = tokenizer.body(text, 510, "right")
    assert body.full_length is None, "the run should have been cut inside, not tokenised whole"
    assert body.encoding.ids == tokenizer._tok.encode(text, add_special_tokens=False).ids[:510]


def test_a_cut_text_knows_its_length_only_when_it_was_tokenised_whole(tokenizer):
    short_but_over = "word " * 600  # within the first window: counted exactly
    encoded = tokenizer.encode(["fine", short_but_over, MIXED * 20], 512)
    assert encoded.truncated == [False, True, True]
    assert encoded.full_lengths[:2] == [tokenizer.token_count("fine"), tokenizer.token_count(short_but_over)]
    assert encoded.full_lengths[2] is None  # only a window was tokenised: "longer than the limit"
    # truncate=False leaves every text whole, as before (the engine never asks for it).
    assert tokenizer.encode([short_but_over], 512, truncate=False).ids[0] == tokenizer._tok.encode(short_but_over).ids


def test_the_engine_refuses_a_long_text_with_what_is_known(fake_checkpoint):
    from bgeserve.engine.engine import EmbeddingEngine

    from .conftest import FakeBackend

    engine = EmbeddingEngine(fake_checkpoint, [FakeBackend()])
    with pytest.raises(InputTooLong) as exact:
        engine._prepare(["fine", "word " * 100], 64, False, "right")
    assert exact.value.index == 1 and exact.value.length == 102
    assert "has 102 tokens, more than the model's limit of 64" in str(exact.value)
    with pytest.raises(InputTooLong) as bounded:
        engine._prepare([[101, 102], MIXED * 20], 64, False, "left")
    assert bounded.value.index == 1 and bounded.value.length is None
    assert "longer than the model's limit of 64" in str(bounded.value)


@pytest.mark.parametrize("direction", ["right", "left"])
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_tokenize_detailed_is_cut_like_embedding(tokenizer, direction, add_special_tokens):
    text = LONG_TEXTS["corpus"]
    detailed = tokenizer.tokenize_detailed(text, add_special_tokens, 64, direction)
    ids = tokenizer.encode([text], 64, direction=direction).ids[0]
    if not add_special_tokens:
        ids = ids[1:-1]
    assert [t.id for t in detailed.tokens] == ids
    assert detailed.truncated and detailed.full_length is None
    for token in detailed.tokens:
        if not token.special:
            assert text[token.start:token.stop] == token.text
