"""The generated bge-m3 checkpoints: real layout, deterministic, and loadable by the reference libraries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from bgeserve.data import sample_texts
from bgeserve.testing import synthetic
from bgeserve.testing.synthetic import main, write_m3_checkpoint

UPSTREAM_FILES = {
    "config.json",
    "pytorch_model.bin",
    "sparse_linear.pt",
    "colbert_linear.pt",
    "tokenizer.json",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "1_Pooling/config.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
}

# Texts where tokenizers most often disagree: scripts without spaces, right-to-left, emoji with
# modifiers and joiners, odd whitespace, full-width forms, special tokens written in the text.
EXTRA_TEXTS = [
    "北京是中国的首都，也是一座历史悠久的城市。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "emoji 🙂👍🏽 👨‍👩‍👧 🇫🇷 done",
    "repeat repeat repeat repeat repeat repeat",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\nhere",
    "ＦＵＬＬ　ｗｉｄｔｈ １２３ and ﬁ ligature Ⅻ",
    "a <mask> in the middle",
    "",
]


def _files(path: Path) -> set[str]:
    # The ONNX backend caches its export next to the model (bgeserve-onnx/): not part of the checkpoint.
    return {
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and not p.relative_to(path).as_posix().startswith("bgeserve-onnx/")
    }


def test_file_set_is_bge_m3s(m3_checkpoint, m3_checkpoint_safetensors):
    assert _files(m3_checkpoint) == UPSTREAM_FILES
    assert _files(m3_checkpoint_safetensors) == UPSTREAM_FILES - {"pytorch_model.bin"} | {"model.safetensors"}


def test_config_and_tokenizer_files_follow_bge_m3(m3_checkpoint):
    config = json.loads((m3_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["XLMRobertaModel"]
    assert config["model_type"] == "xlm-roberta"
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (1, 0, 2)
    assert config["max_position_embeddings"] == 514
    assert config["hidden_size"] == 32
    tokenizer = Tokenizer.from_file(str(m3_checkpoint / "tokenizer.json"))
    # Tiny: the embedding table is exactly the tokenizer's size.
    assert config["vocab_size"] == tokenizer.get_vocab_size(with_added_tokens=True)
    assert [tokenizer.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert tokenizer.token_to_id("<mask>") == config["vocab_size"] - 1
    assert json.loads((m3_checkpoint / "tokenizer_config.json").read_text())["model_max_length"] == 8192
    assert json.loads((m3_checkpoint / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"]
    # Trained on real text: common words are single pieces, not characters.
    assert tokenizer.encode("is the").tokens == ["<s>", "▁is", "▁the", "</s>"]


def test_same_seed_gives_identical_files_and_another_seed_does_not(m3_checkpoint, tmp_path):
    again = write_m3_checkpoint(tmp_path / "again")
    for name in ("pytorch_model.bin", "sparse_linear.pt", "colbert_linear.pt", "tokenizer.json",
                 "sentencepiece.bpe.model"):
        assert (again / name).read_bytes() == (m3_checkpoint / name).read_bytes(), name
    other = write_m3_checkpoint(tmp_path / "other", seed=1)
    assert (other / "pytorch_model.bin").read_bytes() != (m3_checkpoint / "pytorch_model.bin").read_bytes()
    # The tokenizer does not depend on the seed.
    assert (other / "tokenizer.json").read_bytes() == (m3_checkpoint / "tokenizer.json").read_bytes()


def test_weight_names_are_transformers_xlm_roberta_names(m3_checkpoint, m3_checkpoint_safetensors,
                                                         m3_checkpoint_prefixed):
    from safetensors.torch import load_file
    from transformers import XLMRobertaConfig, XLMRobertaModel

    config = XLMRobertaConfig.from_pretrained(m3_checkpoint)
    expected = {k: v.shape for k, v in XLMRobertaModel(config).state_dict().items()}
    bin_weights = torch.load(m3_checkpoint / "pytorch_model.bin", weights_only=True)
    assert {k: v.shape for k, v in bin_weights.items()} == expected
    assert all(v.dtype == torch.float32 for v in bin_weights.values())

    st_weights = load_file(m3_checkpoint_safetensors / "model.safetensors")
    assert st_weights.keys() == bin_weights.keys()
    assert all(torch.equal(st_weights[k], bin_weights[k]) for k in bin_weights)

    prefixed = torch.load(m3_checkpoint_prefixed / "pytorch_model.bin", weights_only=True)
    assert set(prefixed) == {"roberta." + k for k in bin_weights}
    assert all(torch.equal(prefixed["roberta." + k], v) for k, v in bin_weights.items())


def test_full_size_has_bge_m3s_names_shapes_and_parameter_count():
    from transformers import XLMRobertaConfig, XLMRobertaModel

    shape = synthetic.SIZES["full"]
    config = XLMRobertaConfig(**synthetic._model_config(shape, shape.vocab_size))
    with torch.device("meta"):  # shapes only: nothing allocated
        expected = {k: tuple(v.shape) for k, v in XLMRobertaModel(config).state_dict().items()}
    spec = synthetic._encoder_spec(shape, shape.vocab_size, "")
    assert {name: dims for name, dims, _ in spec} == expected
    assert sum(int(np.prod(dims)) for _, dims, _ in spec) == 567_754_752  # BAAI/bge-m3's count


def test_heads_are_fp16_with_upstream_shapes(m3_checkpoint):
    sparse = torch.load(m3_checkpoint / "sparse_linear.pt", weights_only=True)
    colbert = torch.load(m3_checkpoint / "colbert_linear.pt", weights_only=True)
    assert {k: (tuple(v.shape), v.dtype) for k, v in sparse.items()} == {
        "weight": ((1, 32), torch.float16), "bias": ((1,), torch.float16)}
    assert {k: (tuple(v.shape), v.dtype) for k, v in colbert.items()} == {
        "weight": ((32, 32), torch.float16), "bias": ((32,), torch.float16)}


def test_transformers_tokenizer_gives_the_same_ids_as_tokenizer_json(m3_checkpoint):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(m3_checkpoint)
    fast = Tokenizer.from_file(str(m3_checkpoint / "tokenizer.json"))
    texts = sample_texts() + EXTRA_TEXTS
    mismatches = [t for t in texts if reference(t)["input_ids"] != fast.encode(t).ids]
    assert mismatches == []
    # Rare characters of the corpus's noise lines are unknown, as in the real vocabulary.
    assert any(3 in fast.encode(t).ids for t in texts)


@pytest.mark.parametrize("variant", ["m3_checkpoint", "m3_checkpoint_safetensors", "m3_checkpoint_prefixed"])
def test_transformers_loads_every_variant_to_the_same_model(variant, request, m3_checkpoint):
    from transformers import AutoModel, AutoTokenizer

    path = request.getfixturevalue(variant)
    model, info = AutoModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    baseline = AutoModel.from_pretrained(m3_checkpoint)
    batch = AutoTokenizer.from_pretrained(path)(["a first text", "北京"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval()(**batch).last_hidden_state
        assert torch.equal(hidden, baseline.eval()(**batch).last_hidden_state)


def test_flagembedding_encodes_all_three_outputs(m3_checkpoint):
    from FlagEmbedding import BGEM3FlagModel

    model = BGEM3FlagModel(str(m3_checkpoint), use_fp16=False, devices="cpu")
    texts = sample_texts()[:24]
    out = model.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True)

    dense = out["dense_vecs"]
    assert dense.shape == (len(texts), 32)
    np.testing.assert_allclose(np.linalg.norm(dense, axis=1), 1.0, rtol=1e-5)
    cosine = dense @ dense.T
    off_diagonal = cosine[~np.eye(len(texts), dtype=bool)]
    # Random weights, but different texts still get clearly different vectors.
    assert off_diagonal.max() < 0.97
    assert off_diagonal.mean() < 0.85

    lengths = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
    for weights, colbert, n in zip(out["lexical_weights"], out["colbert_vecs"], lengths, strict=True):
        assert colbert.shape == (n - 1, 32)
        assert all(w > 0 and int(k) not in (0, 1, 2, 3) for k, w in weights.items())
    # relu drops some tokens and keeps others: neither all nor none.
    kept = sum(len(w) for w in out["lexical_weights"])
    distinct = sum(len(set(ids[1:-1]) - {3}) for ids in model.tokenizer(texts)["input_ids"])
    assert 0.1 * distinct < kept < 0.95 * distinct


def test_sentence_transformers_reads_the_module_files(m3_checkpoint):
    from FlagEmbedding import BGEM3FlagModel
    from sentence_transformers import SentenceTransformer

    texts = ["What is BGE M3?", "Definition of BM25"]
    st = SentenceTransformer(str(m3_checkpoint), device="cpu").encode(texts)
    flag = BGEM3FlagModel(str(m3_checkpoint), use_fp16=False, devices="cpu").encode(texts)["dense_vecs"]
    np.testing.assert_allclose(st, flag, atol=1e-5)


def test_without_sentencepiece_tokenizer_json_alone_is_written(tmp_path, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    synthetic._trained_tokenizer.cache_clear()
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` fail
    try:
        path = write_m3_checkpoint(tmp_path / "m3")
        synthetic._trained_tokenizer.cache_clear()  # train again rather than reuse
        second = write_m3_checkpoint(tmp_path / "m3-again")
    finally:
        synthetic._trained_tokenizer.cache_clear()
    assert _files(path) == UPSTREAM_FILES - {"sentencepiece.bpe.model"}
    # Deterministic across trainings, though the Unigram trainer itself is not.
    assert (path / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    reference = AutoTokenizer.from_pretrained(path)
    fast = Tokenizer.from_file(str(path / "tokenizer.json"))
    texts = sample_texts()[:50] + EXTRA_TEXTS
    assert [reference(t)["input_ids"] for t in texts] == [fast.encode(t).ids for t in texts]
    AutoModel.from_pretrained(path)


def test_cli_writes_a_checkpoint(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--weights", "safetensors", "--seed", "3"]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "out"
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_rejects_bad_arguments_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "out"), "--size", "huge"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "file")])
    assert "not a directory" in capsys.readouterr().err


def test_unknown_size_or_format_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown size"):
        write_m3_checkpoint(tmp_path, size="huge")
    with pytest.raises(ValueError, match="unknown weights format"):
        write_m3_checkpoint(tmp_path, weights="onnx")
