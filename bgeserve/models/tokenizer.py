"""Fast tokenisation (Hugging Face `tokenizers`) with explicit, thread-safe and bounded truncation.

A long text is not tokenised whole to keep its first (or last) N tokens: a window of it is, and only
tokens that provably come out the same in the whole text are kept (`TextTokenizer.body`). So the work
per input follows the model's limit, not the size of the text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from bgeserve.core import SimpleToken
from bgeserve.errors import InvalidCheckpoint, InvalidInput

# First window per body token kept: ~4.5 characters make a token in English, ~1 in CJK; the window
# doubles while it holds too few tokens.
_CHARS_PER_TOKEN = 8
_MIN_WINDOW = 1024
# Characters next to a window's cut edge whose tokens are never trusted: normalisers, pre-tokenizers
# and added-token matching decide each character from a few neighbours, far fewer than this.
_EDGE_MARGIN = 64
# In-word cut points looked for past the limit before giving up and tokenising the text whole.
_MAX_CUT_CANDIDATES = 128


@dataclass(frozen=True)
class Tokenized:
    """Token ids per input (special tokens included) and whether each was cut."""

    ids: list[list[int]]
    truncated: list[bool]
    # Length before truncation, special tokens included; None: longer than the limit, not counted
    # (only a window of the text was tokenised).
    full_lengths: list[int | None]


@dataclass(frozen=True)
class DetailedTokens:
    """/tokenize's answer for one text: its tokens, whether they were cut, the whole text's length
    (special tokens included; None when only known to be over the limit)."""

    tokens: list[SimpleToken]
    truncated: bool
    full_length: int | None


@dataclass(frozen=True)
class Body:
    """The body tokens (no special tokens) a text keeps under a token budget.

    `encoding` holds at most `budget` tokens with character offsets relative to `offset` in the
    text; `full_length` is the body length of the whole text, None when only known to exceed the budget.
    """

    encoding: Encoding
    offset: int
    full_length: int | None

    @property
    def cut(self) -> bool:
        return self.full_length is None or self.full_length > len(self.encoding.ids)


def check_direction(direction: str) -> None:
    """Truncation keeps the start of a text ("right") or its end ("left")."""
    if direction not in ("right", "left"):
        raise InvalidInput(f"truncation direction must be 'right' or 'left', not {direction!r}")


class TextTokenizer:
    """Wraps `tokenizer.json`. Never mutates the shared tokenizer, so threads may share one."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        # Truncation and padding saved inside tokenizer.json would silently cut inputs: we do it ourselves.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.num_special_tokens = self._tok.num_special_tokens_to_add(is_pair=False)
        # The shortest tokenization of a text: its special tokens and one token.
        self.shortest_input = self.num_special_tokens + 1
        added = self._tok.get_added_tokens_decoder()
        self.special_ids = frozenset(tid for tid, token in added.items() if token.special)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.prefix_ids, self.suffix_ids = self._template_ends()
        # An added token cut by the window edge would be matched differently: keep clear of the longest.
        self._edge = _EDGE_MARGIN + max((len(token.content) for token in added.values()), default=0)
        self._piece_length, self._unk_id = self._unigram_cut_spec()

    def _template_ends(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The special ids the tokenizer puts before and after a text (`<s>` ... `</s>`, `[CLS]` ... `[SEP]`)."""
        enc = self._tok.encode("a", add_special_tokens=True)
        mask = enc.special_tokens_mask
        lead = next((i for i, special in enumerate(mask) if not special), len(mask))
        trail = next((i for i, special in enumerate(reversed(mask)) if not special), 0)
        return tuple(enc.ids[:lead]), tuple(enc.ids[len(enc.ids) - trail:])

    def _unigram_cut_spec(self) -> tuple[int | None, int | None]:
        """(longest vocabulary piece, unknown-token id) of a deterministic Unigram model (XLM-R, bge-m3);
        (None, None) for other models.

        Only such a model can be cut inside a word (see `_forced_boundary`): byte fallback and sampling
        (`alpha`) change what a run of characters becomes, so they rule it out.
        """
        model = self._tok.model
        if type(model).__name__ != "Unigram" or getattr(model, "alpha", None):
            return None, None
        spec = json.loads(self._tok.to_str()).get("model", {})
        vocab = spec.get("vocab") or []
        if spec.get("byte_fallback") or not vocab:
            return None, None
        return max(len(piece) for piece, _ in vocab), spec.get("unk_id")

    def is_own_tokenization(self, ids: list[int]) -> bool:
        """True when `ids` start and end with this tokenizer's special tokens, as its own encoding does."""
        prefix, suffix = self.prefix_ids, self.suffix_ids
        return (
            len(ids) >= len(prefix) + len(suffix)
            and tuple(ids[: len(prefix)]) == prefix
            and tuple(ids[len(ids) - len(suffix):]) == suffix
        )

    def truncate_ids(self, ids: list[int], max_length: int, direction: str = "right") -> list[int]:
        """Cuts an own tokenization to `max_length` the way text truncation does: special tokens kept."""
        check_direction(direction)
        if len(ids) <= max_length:
            return ids
        head, tail = len(self.prefix_ids), len(self.suffix_ids)
        body = ids[head: len(ids) - tail]
        keep = max_length - head - tail
        body = body[:keep] if direction == "right" else body[len(body) - keep:]
        return [*ids[:head], *body, *ids[len(ids) - tail:]]

    @classmethod
    def from_dir(cls, path: Path) -> TextTokenizer:
        """Loads `tokenizer.json` from a checkpoint directory."""
        file = path / "tokenizer.json"
        if not file.is_file():
            raise InvalidCheckpoint(
                f"{path} has no tokenizer.json (bgeserve needs the fast tokenizer file that "
                f"Hugging Face checkpoints ship)"
            )
        return cls(Tokenizer.from_file(str(file)))

    def token_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self._tok.token_to_id(token)

    # -- bounded truncation -------------------------------------------------------------------------

    def body(self, text: str, budget: int, direction: str = "right") -> Body:
        """The first (`right`) or last (`left`) `budget` body tokens of `text`, as tokenising it whole
        and then cutting would give, from a window of the text where that is provably the same.

        The window grows (doubling) until it holds more than `budget` tokens that cannot differ from the
        whole text's, else the text is tokenised whole; either way the answer is exact.
        """
        check_direction(direction)
        size = _first_window(budget)
        while size < len(text):
            start = 0 if direction == "right" else len(text) - size
            window = self._tok.encode(text[start: start + size], add_special_tokens=False)
            safe = self._safe_head(window, size, budget) if direction == "right" else self._safe_tail(window)
            if safe > budget:
                window.truncate(budget, direction=direction)
                return Body(window, start, None)
            if safe < 0:
                break  # no provable cut point (one long run the model cannot be cut inside)
            size *= 2
        return _whole(self._tok.encode(text, add_special_tokens=False), budget, direction)

    def _safe_head(self, window: Encoding, size: int, budget: int) -> int:
        """How many leading tokens of a prefix window the whole text provably starts with (-1: none can be
        found past `budget` by growing the window either).

        A boundary between two words (pre-tokens) far enough from the edge is safe: each word is
        tokenised on its own. So is a boundary inside a word that no vocabulary piece spans
        (`_forced_boundary`).
        """
        words, offsets = window.word_ids, window.offsets
        limit = size - self._edge
        best = 0
        in_word_tries = 0
        for k in range(1, len(words)):
            if offsets[k - 1][1] > limit or words[k] is None or words[k - 1] is None:
                break
            if words[k] != words[k - 1]:
                best = k
                if k > budget:
                    return k
            elif k > budget and self._piece_length and in_word_tries < _MAX_CUT_CANDIDATES:
                in_word_tries += 1
                if self._forced_boundary(window, k, limit):
                    return k
        if in_word_tries >= _MAX_CUT_CANDIDATES:
            return -1
        return best

    def _safe_tail(self, window: Encoding) -> int:
        """How many trailing tokens of a suffix window the whole text provably ends with.

        Only boundaries between words count: a cut inside a word would be exact for the Viterbi search
        forward from the cut, but not for the scores summed from the word's start (rounding).
        """
        words, offsets = window.word_ids, window.offsets
        n = len(words)
        for k in range(1, n):
            if words[k] is None or words[k - 1] is None:
                continue
            if offsets[k][0] >= self._edge and words[k] != words[k - 1]:
                return n - k
        return 0

    def _forced_boundary(self, window: Encoding, k: int, limit: int) -> bool:
        """True when no vocabulary piece spans the boundary before token `k` inside one word.

        Unigram picks the best-scoring split of each word among the vocabulary pieces (Viterbi). If no
        piece crosses a position, every split passes through it, and the split up to it is the best
        split of the text up to it, the same computation whether the word goes on or not.
        """
        ids, tokens, words, offsets = window.ids, window.tokens, window.word_ids, window.offsets
        span = self._piece_length or 0
        word = words[k]
        # The same word on both sides, no unknown characters near (consecutive <unk>s are fused).
        left, i = "", k - 1
        while len(left) < span - 1 and i >= 0 and words[i] == word:
            if ids[i] == self._unk_id:
                return False
            left = tokens[i] + left
            i -= 1
        right, j = "", k
        while len(right) < span - 1 and j < len(ids) and words[j] == word:
            if ids[j] == self._unk_id or offsets[j][1] > limit:
                return False
            right += tokens[j]
            j += 1
        if len(right) < span - 1 and j >= len(ids):
            return False  # the word may go on past what the window shows
        model = self._tok.model
        for a in range(1, min(len(left), span - 1) + 1):
            for b in range(1, min(len(right), span - a) + 1):
                if model.token_to_id(left[-a:] + right[:b]) is not None:
                    return False
        return True

    def encode(
        self,
        texts: list[str],
        max_length: int,
        truncate: bool = True,
        direction: str = "right",
    ) -> Tokenized:
        """Tokenises with special tokens; inputs longer than max_length are cut when truncate is set
        (keeping the special tokens, as transformers' truncation does), from a window of a long text
        (`full_lengths` None for those), and left whole otherwise (tokenised whole: unbounded work, so
        the engine always cuts and refuses what was cut when a request says `truncate: false`)."""
        check_direction(direction)
        if max_length < self.shortest_input:
            raise InvalidInput(f"max_length must be at least {self.shortest_input}")
        if not truncate:
            whole = [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=True)]
            return Tokenized(ids=whole, truncated=[False] * len(texts), full_lengths=[len(ids) for ids in whole])
        budget = max_length - self.num_special_tokens
        # Texts that fit in a first window are tokenised whole, together (the fast path).
        short = [i for i, text in enumerate(texts) if len(text) <= _first_window(budget)]
        batch = self._tok.encode_batch([texts[i] for i in short], add_special_tokens=False)
        encoded = dict(zip(short, batch, strict=True))
        ids, truncated, lengths = [], [], []
        for index, text in enumerate(texts):
            known = encoded.get(index)
            body = self.body(text, budget, direction) if known is None else _whole(known, budget, direction)
            full = None if body.full_length is None else body.full_length + self.num_special_tokens
            lengths.append(full)
            ids.append(self._tok.post_process(body.encoding).ids)
            truncated.append(body.cut)
        return Tokenized(ids=ids, truncated=truncated, full_lengths=lengths)

    def token_count(self, text: str) -> int:
        """Tokens of one text with special tokens, untruncated."""
        return len(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Ids back to text."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def tokenize_detailed(
        self,
        text: str,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        direction: str = "right",
    ) -> DetailedTokens:
        """Tokens with their text and character offsets (TEI /tokenize), cut to `max_length` tokens
        (special tokens counted whether added or not) as `encode` cuts them; no limit when None."""
        if max_length is None:
            whole = self._tok.encode(text, add_special_tokens=False)
            body = Body(whole, 0, len(whole.ids))
        else:
            body = self.body(text, max_length - self.num_special_tokens, direction)
        enc = self._tok.post_process(body.encoding) if add_special_tokens else body.encoding
        out = []
        for tid, piece, special, (start, stop) in zip(
            enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets, strict=True
        ):
            is_special = bool(special)
            start, stop = start + body.offset, stop + body.offset
            out.append(
                SimpleToken(
                    id=tid,
                    text=piece if is_special else text[start:stop],
                    special=is_special,
                    start=None if is_special else start,
                    stop=None if is_special else stop,
                )
            )
        full = None if body.full_length is None else body.full_length + self.num_special_tokens
        return DetailedTokens(out, body.cut, full)


def _first_window(budget: int) -> int:
    return max(_MIN_WINDOW, budget * _CHARS_PER_TOKEN)


def _whole(encoding: Encoding, budget: int, direction: str) -> Body:
    """The Body of a text tokenised whole: cut to `budget` if longer, its full length known."""
    full = len(encoding.ids)
    if full > budget:
        encoding.truncate(budget, direction=direction)
    return Body(encoding, 0, full)
