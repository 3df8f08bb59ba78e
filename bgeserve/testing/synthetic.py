"""Random checkpoints laid out exactly like the Hugging Face repo BAAI/bge-m3, for tests and benchmarks.

`write_m3_checkpoint` writes every file the real repo has (config, fp32 weights, fp16 sparse and ColBERT
heads, a SentencePiece tokenizer and its fast `tokenizer.json`, the sentence-transformers files), so
the same loaders that read the real model, ours and the FlagEmbedding / transformers oracles, read it.
The weights are random but seeded; the tokenizer is trained on `bgeserve/data/mixed.txt`, a small
multilingual corpus, so texts split into real sub-word pieces.

    python -m bgeserve.testing.synthetic OUT_DIR [--size tiny|wide|full] [--weights bin|safetensors]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from tokenizers.trainers import UnigramTrainer

from bgeserve.data import sample_texts

__all__ = ["SIZES", "M3Size", "write_m3_checkpoint", "main"]

# SentencePiece pieces to train. mixed.txt holds ~1650 distinct characters (CJK, emoji, fuzz lines),
# so fewer pieces than 2000 leave almost no room for multi-character pieces.
_SPM_PIECES = 2000
# fairseq's dictionary, which XLM-R kept: these four first, then the SentencePiece pieces, `<mask>` last.
_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
_MASK = "<mask>"
_WEIGHT_FILES = {"bin": "pytorch_model.bin", "safetensors": "model.safetensors"}


@dataclass(frozen=True)
class M3Size:
    """Shape of an XLM-RoBERTa encoder. `vocab_size` None means: exactly the trained tokenizer's size."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int | None


SIZES: dict[str, M3Size] = {
    # 514 positions: XLM-R positions start at pad_id + 1 = 2, so 512 usable tokens.
    "tiny": M3Size(32, 2, 4, 64, 514, None),
    # bge-m3's width with one layer: for tools that only take bge-m3's hidden size (bge-m3-lite).
    "wide": M3Size(1024, 1, 16, 4096, 514, None),
    # BAAI/bge-m3 itself (~568M parameters, ~2.27 GB in fp32).
    "full": M3Size(1024, 24, 16, 4096, 8194, 250002),
}


def write_m3_checkpoint(
    path: str | Path,
    size: str = "tiny",
    weights: str = "bin",
    seed: int = 0,
    key_prefix: str = "",
) -> Path:
    """Writes a random checkpoint with BAAI/bge-m3's file layout into `path` and returns the directory.

    `size` is "tiny" (hidden 32, 2 layers, vocab = the tokenizer's), "wide" (hidden 1024, 1 layer) or
    "full" (bge-m3's real shapes).
    `weights` is "bin" (`pytorch_model.bin`, as upstream) or "safetensors" (`model.safetensors`).
    `key_prefix` (e.g. "roberta.") is put before every encoder weight name, as some checkpoints do.
    The same seed gives byte-identical weight files; the tokenizer does not depend on the seed.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    if weights not in _WEIGHT_FILES:
        raise ValueError(f"unknown weights format {weights!r}; choose one of {sorted(_WEIGHT_FILES)}")
    shape = SIZES[size]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    spm_model, tokenizer_json = _trained_tokenizer()
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab_size = shape.vocab_size or tokenizer_vocab
    if vocab_size < tokenizer_vocab:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer_vocab}")

    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    if spm_model is not None:
        (out / "sentencepiece.bpe.model").write_bytes(spm_model)
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "special_tokens_map.json", _special_tokens_map())
    _write_json(out / "config.json", _model_config(shape, vocab_size))
    _write_sentence_transformers_files(out, shape.hidden_size)

    # A weights file of the other format left from an earlier run would be loaded instead of this one.
    for other in set(_WEIGHT_FILES) - {weights}:
        (out / _WEIGHT_FILES[other]).unlink(missing_ok=True)
    generator = torch.Generator().manual_seed(seed)
    spec = _encoder_spec(shape, vocab_size, key_prefix)
    tensors = _random_tensors(spec, generator)
    if weights == "bin":
        # torch.save needs the whole dict: one copy of the weights, each made once.
        torch.save(dict(tensors), out / _WEIGHT_FILES["bin"])
    else:
        _stream_safetensors(out / _WEIGHT_FILES["safetensors"], spec, tensors)

    # Heads come after the encoder from the same generator; stored in fp16 as upstream does.
    heads = dict(_random_tensors(_heads_spec(shape.hidden_size), generator))
    torch.save(
        {"weight": heads["sparse.weight"].half(), "bias": heads["sparse.bias"].half()},
        out / "sparse_linear.pt",
    )
    torch.save(
        {"weight": heads["colbert.weight"].half(), "bias": heads["colbert.bias"].half()},
        out / "colbert_linear.pt",
    )
    return out


# --- weights ---------------------------------------------------------------------------------------

# (name, shape, kind); kind picks the initialisation in `_random_tensors`.
_Spec = list[tuple[str, tuple[int, ...], str]]


def _encoder_spec(shape: M3Size, vocab_size: int, prefix: str) -> _Spec:
    """Names and shapes of transformers' XLMRobertaModel state dict (same order as it lists them)."""
    h, f = shape.hidden_size, shape.intermediate_size
    spec: _Spec = [
        ("embeddings.word_embeddings.weight", (vocab_size, h), "embedding"),
        ("embeddings.position_embeddings.weight", (shape.max_position_embeddings, h), "embedding"),
        ("embeddings.token_type_embeddings.weight", (1, h), "embedding"),
        ("embeddings.LayerNorm.weight", (h,), "norm"),
        ("embeddings.LayerNorm.bias", (h,), "bias"),
    ]
    for i in range(shape.num_layers):
        layer = f"encoder.layer.{i}"
        linears = [
            (f"{layer}.attention.self.query", h, h),
            (f"{layer}.attention.self.key", h, h),
            (f"{layer}.attention.self.value", h, h),
            (f"{layer}.attention.output.dense", h, h),
            (f"{layer}.intermediate.dense", f, h),
            (f"{layer}.output.dense", h, f),
        ]
        for name, rows, cols in linears:
            kind = "query_key" if name.endswith((".query", ".key")) else "linear"
            spec += [(f"{name}.weight", (rows, cols), kind), (f"{name}.bias", (rows,), "bias")]
            if name.endswith("attention.output.dense"):
                spec += [(f"{layer}.attention.output.LayerNorm.weight", (h,), "norm"),
                         (f"{layer}.attention.output.LayerNorm.bias", (h,), "bias")]
        spec += [(f"{layer}.output.LayerNorm.weight", (h,), "norm"),
                 (f"{layer}.output.LayerNorm.bias", (h,), "bias")]
    spec += [("pooler.dense.weight", (h, h), "linear"), ("pooler.dense.bias", (h,), "bias")]
    return [(prefix + name, dims, kind) for name, dims, kind in spec]


def _heads_spec(hidden: int) -> _Spec:
    return [
        ("sparse.weight", (1, hidden), "sparse"),
        ("sparse.bias", (1,), "bias"),
        ("colbert.weight", (hidden, hidden), "linear"),
        ("colbert.bias", (hidden,), "bias"),
    ]


def _random_tensors(spec: _Spec, generator: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    """Makes each tensor in turn, in spec order, so a seed always gives the same values.

    Embeddings follow BERT's init (normal, std 0.02); LayerNorm normalises them anyway. Linear weights
    use std 1/sqrt(fan_in) rather than BERT's 0.02, and query/key three times that: with BERT's init
    at hidden 32 every layer is close to the identity, attention is uniform, and every text's CLS
    vector nearly the same (mean cosine 0.96 between unrelated texts; 0.66 with these scales). The
    sparse head is scaled so that token weights span roughly 0..0.5, as the real model's do.
    """
    gains = {"linear": 1.0, "query_key": 3.0, "sparse": 0.25}
    for name, dims, kind in spec:
        t = torch.empty(dims, dtype=torch.float32)
        if kind == "embedding":
            t.normal_(0.0, 0.02, generator=generator)
        elif kind in gains:
            t.normal_(0.0, gains[kind] / math.sqrt(dims[-1]), generator=generator)
        elif kind == "norm":
            t.normal_(1.0, 0.02, generator=generator)
        else:  # bias
            t.normal_(0.0, 0.02, generator=generator)
        yield name, t


def _stream_safetensors(file: Path, spec: _Spec, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Writes a safetensors file tensor by tensor: the header is known from the shapes alone."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims, _ in spec:
        nbytes = 4 * math.prod(dims)
        header[name] = {"dtype": "F32", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format wants the data 8-byte aligned
    with open(file, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for _, tensor in tensors:
            # numpy's native order is little-endian on every platform torch ships for; no byte copy.
            fh.write(tensor.numpy().data)


# --- tokenizer --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _trained_tokenizer(use_sentencepiece: bool = True) -> tuple[bytes | None, str]:
    """(sentencepiece.bpe.model bytes or None, tokenizer.json text), trained once per process.

    Falls back to training with `tokenizers` alone (no .model file) when sentencepiece, a dev-only
    dependency, is missing.
    """
    if use_sentencepiece:
        try:
            import sentencepiece  # noqa: F401
            from sentencepiece import sentencepiece_model_pb2  # noqa: F401
        except ImportError:
            use_sentencepiece = False
    if use_sentencepiece:
        model = _train_sentencepiece(sample_texts())
        vocab, charsmap = _xlmr_vocab_from_spm(model)
        return model, _xlmr_tokenizer(vocab, charsmap).to_str(pretty=True)
    return None, _xlmr_tokenizer(_train_unigram(sample_texts()), None).to_str(pretty=True)


def _train_sentencepiece(lines: list[str]) -> bytes:
    import sentencepiece as spm

    buffer = io.BytesIO()
    # One thread and the file's own order: training is then deterministic.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=_SPM_PIECES,
        character_coverage=0.9995,
        normalization_rule_name="nmt_nfkc",
        byte_fallback=False,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buffer.getvalue()


def _xlmr_vocab_from_spm(model: bytes) -> tuple[list[tuple[str, float]], bytes]:
    """fairseq's id layout that XLM-R uses, plus the normaliser's precompiled character map.

    SentencePiece's own ids are <unk>=0, <s>=1, </s>=2, then the pieces; fairseq put <s>, <pad>, </s>,
    <unk> first, so every piece id moves up by one, and appended <mask>.
    """
    from sentencepiece import sentencepiece_model_pb2

    # The generated module makes its message classes at import time; its py.typed declares none of them.
    proto = cast(Any, sentencepiece_model_pb2).ModelProto()
    proto.ParseFromString(model)
    if [p.piece for p in proto.pieces[:3]] != ["<unk>", "<s>", "</s>"]:
        raise RuntimeError("unexpected SentencePiece special pieces")
    vocab = [(t, 0.0) for t in _SPECIALS]
    vocab += [(p.piece, p.score) for p in proto.pieces[3:]]
    vocab.append((_MASK, 0.0))
    return vocab, proto.normalizer_spec.precompiled_charsmap


def _train_unigram(lines: list[str]) -> list[tuple[str, float]]:
    """Unigram vocabulary trained with `tokenizers`, laid out like XLM-R's (specials first, mask last)."""
    tokenizer = Tokenizer(Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    trainer = UnigramTrainer(
        vocab_size=_SPM_PIECES + len(_SPECIALS),
        special_tokens=list(_SPECIALS),
        unk_token="<unk>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    trained = json.loads(tokenizer.to_str())["model"]["vocab"]
    if [piece for piece, _ in trained[:4]] != list(_SPECIALS):
        raise RuntimeError("unexpected special-token layout from the Unigram trainer")
    # The trainer is not deterministic: scores differ in the last digits (parallel sums), and the
    # rare characters it keeps to cover the corpus get near-equal lowest scores in hash order. Round
    # the former, give the latter one score, and order by score then text: stable ids run to run.
    pieces = [(str(p), round(float(s), 6)) for p, s in trained[len(_SPECIALS):]]
    floor = min(score for _, score in pieces)
    pieces = [(p, floor if score < floor + 0.01 else score) for p, score in pieces]
    pieces.sort(key=lambda piece: (-piece[1], piece[0]))
    return [(t, 0.0) for t in _SPECIALS] + pieces + [(_MASK, 0.0)]


def _xlmr_tokenizer(vocab: list[tuple[str, float]], charsmap: bytes | None) -> Tokenizer:
    """The fast tokenizer, built as XLM-R's (and so bge-m3's) tokenizer.json is.

    That file normalises with SentencePiece's precompiled NFKC map only, then splits on whitespace
    and marks each word with a leading `▁`: runs of spaces, and leading or trailing ones, produce no
    token, exactly as SentencePiece itself does.
    """
    tokenizer = Tokenizer(Unigram(vocab, unk_id=_SPECIALS.index("<unk>"), byte_fallback=False))
    if charsmap:
        tokenizer.normalizer = normalizers.Precompiled(charsmap)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in _SPECIALS]
        # <mask> swallows the space before it, as in XLM-R.
        + [AddedToken(_MASK, lstrip=True, normalized=False, special=True)]
    )
    return tokenizer


# --- small JSON files ----------------------------------------------------------------------------------

def _write_json(file: Path, data: object) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _model_config(shape: M3Size, vocab_size: int) -> dict[str, object]:
    # Field for field BAAI/bge-m3's config.json, shapes aside.
    return {
        "_name_or_path": "",
        "architectures": ["XLMRobertaModel"],
        "attention_probs_dropout_prob": 0.1,
        "bos_token_id": 0,
        "classifier_dropout": None,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": shape.max_position_embeddings,
        "model_type": "xlm-roberta",
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "output_past": True,
        "pad_token_id": 1,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "transformers_version": "4.33.0",
        "type_vocab_size": 1,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _tokenizer_config() -> dict[str, object]:
    return {
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": True,
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": {
            "__type": "AddedToken",
            "content": "<mask>",
            "lstrip": True,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        },
        "model_max_length": 8192,
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "sp_model_kwargs": {},
        "tokenizer_class": "XLMRobertaTokenizer",
        "unk_token": "<unk>",
    }


def _special_tokens_map() -> dict[str, object]:
    return {
        "bos_token": "<s>",
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": {
            "content": "<mask>",
            "lstrip": True,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
    }


def _write_sentence_transformers_files(out: Path, hidden: int) -> None:
    _write_json(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    _write_json(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    })
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": 8192, "do_lower_case": False})
    _write_json(out / "config_sentence_transformers.json", {
        "__version__": {"sentence_transformers": "2.2.2", "transformers": "4.33.0", "pytorch": "2.1.2+cu121"},
    })


# --- command line -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`python -m bgeserve.testing.synthetic OUT_DIR [--size full] [--weights safetensors]`."""
    parser = argparse.ArgumentParser(
        prog="python -m bgeserve.testing.synthetic",
        description="Write a random checkpoint with BAAI/bge-m3's file layout (for tests and benchmarks).",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny",
                        help="tiny: hidden 32, 2 layers; full: bge-m3's real shapes, ~2.3 GB")
    parser.add_argument("--weights", choices=sorted(_WEIGHT_FILES), default="bin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--key-prefix", default="", help='e.g. "roberta." before every encoder weight name')
    args = parser.parse_args(argv)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"{args.out_dir} exists and is not a directory")
    try:
        out = write_m3_checkpoint(args.out_dir, args.size, args.weights, args.seed, args.key_prefix)
    except OSError as exc:
        print(f"error: cannot write {args.out_dir}: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
