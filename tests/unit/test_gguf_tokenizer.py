"""GGUF vocabularies (byte-level BPE and SentencePiece) → tokenizers, checked against
transformers' own GGUF loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFWriter
from tokenizers import Tokenizer

from model_formats.gguf.convert import convert_gguf
from model_formats.gguf.tokenizer import build_tokenizer
from tests.unit.gguf_files import PROMPTS, hf_model, write_gguf


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt-2"])
def test_tiny_tokenizer_matches_transformers(tmp_path: Path, pre: str) -> None:
    from transformers import AutoTokenizer

    model, weights = hf_model(tmp_path / "hf", "qwen2")
    write_gguf(tmp_path / "m.gguf", "qwen2", model.config.to_dict(), weights, pre=pre)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for prompt in PROMPTS:
        ids = ours.encode(prompt).ids
        assert ids == theirs(prompt).input_ids, prompt
        assert ours.decode(ids, skip_special_tokens=False) == prompt
    assert ours.encode("a<tool>b").tokens[1] == "<tool>"  # user-defined: whole, but not special
    assert ours.decode(ours.encode("<|im_end|><tool>").ids) == "<tool>"


def test_sentencepiece_vocabulary_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    pieces = ["\u2581", "t", "h", "e", "a", "n", "d", "\u2581t", "he", "\u2581the", "an",
              "\u2581an", "\u2581and", "\u2581a", "nd", "é"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    w = GGUFWriter(tmp_path / "sp.gguf", "llama")
    w.add_tokenizer_model("llama"), w.add_token_list(tokens), w.add_unk_token_id(0)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_bos_token_id(1), w.add_eos_token_id(2)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    meta = {k: f.contents() for k, f in GGUFReader(tmp_path / "sp.gguf").fields.items()}
    ours, config = build_tokenizer(meta)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    for prompt in ["the and an", " the  and", "thé\nand", "hat 🤗", "</s>the<s>", ""]:
        assert ours.encode(prompt).ids == theirs(prompt).input_ids, prompt
        ids = ours.encode(prompt).ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), prompt
    assert config["add_bos_token"] and config["bos_token"] == "<s>"
