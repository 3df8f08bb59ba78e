"""Fast tokenisation (Hugging Face `tokenizers`) with explicit, thread-safe truncation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from bgeserve.errors import InvalidCheckpoint, InvalidInput


@dataclass(frozen=True)
class Tokenized:
    """Token ids per input (special tokens included) and whether each was cut."""

    ids: list[list[int]]
    truncated: list[bool]
    # Length before truncation, special tokens included.
    full_lengths: list[int]


@dataclass(frozen=True)
class TokenInfo:
    """One token as TEI's /tokenize reports it."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class TextTokenizer:
    """Wraps `tokenizer.json`. Never mutates the shared tokenizer, so threads may share one."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        # Truncation and padding saved inside tokenizer.json would silently cut inputs: we do it ourselves.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.num_special_tokens = self._tok.num_special_tokens_to_add(is_pair=False)
        self.special_ids = frozenset(
            tid
            for tid, token in self._tok.get_added_tokens_decoder().items()
            if token.special
        )
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.prefix_ids, self.suffix_ids = self._template_ends()

    def _template_ends(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The special ids the tokenizer puts before and after a text (`<s>` ... `</s>`, `[CLS]` ... `[SEP]`)."""
        enc = self._tok.encode("a", add_special_tokens=True)
        mask = enc.special_tokens_mask
        lead = next((i for i, special in enumerate(mask) if not special), len(mask))
        trail = next((i for i, special in enumerate(reversed(mask)) if not special), 0)
        return tuple(enc.ids[:lead]), tuple(enc.ids[len(enc.ids) - trail:])

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

    def encode(
        self,
        texts: list[str],
        max_length: int,
        truncate: bool = True,
        direction: str = "right",
    ) -> Tokenized:
        """Tokenises with special tokens; inputs longer than max_length are cut when truncate is set
        (keeping the special tokens, as transformers' truncation does) and left whole otherwise."""
        if direction not in ("right", "left"):
            raise InvalidInput(f"truncation direction must be 'right' or 'left', not {direction!r}")
        if max_length < self.num_special_tokens + 1:
            raise InvalidInput(f"max_length must be at least {self.num_special_tokens + 1}")
        encodings = self._tok.encode_batch(texts, add_special_tokens=True)
        ids, truncated, lengths = [], [], []
        for text, enc in zip(texts, encodings, strict=True):
            lengths.append(len(enc.ids))
            if len(enc.ids) <= max_length or not truncate:
                ids.append(enc.ids)
                truncated.append(False)
                continue
            body = self._tok.encode(text, add_special_tokens=False)
            body.truncate(max_length - self.num_special_tokens, direction=direction)
            ids.append(self._tok.post_process(body).ids)
            truncated.append(True)
        return Tokenized(ids=ids, truncated=truncated, full_lengths=lengths)

    def token_count(self, text: str) -> int:
        """Tokens of one text with special tokens, untruncated."""
        return len(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Ids back to text."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of one id."""
        return self._tok.id_to_token(token_id)

    def tokenize_detailed(self, text: str, add_special_tokens: bool = True) -> list[TokenInfo]:
        """Tokens with their text and character offsets (TEI /tokenize)."""
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        out = []
        for tid, special, (start, stop) in zip(
            enc.ids, enc.special_tokens_mask, enc.offsets, strict=True
        ):
            is_special = bool(special)
            out.append(
                TokenInfo(
                    id=tid,
                    text=self._tok.id_to_token(tid) if is_special else text[start:stop],
                    special=is_special,
                    start=None if is_special else start,
                    stop=None if is_special else stop,
                )
            )
        return out
