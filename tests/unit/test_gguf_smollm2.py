"""The real SmolLM2 GGUF file, converted, against transformers' own GGUF loader: tokenizer,
chat template, config and logits."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers

from services.config import ModelConfig
from tests.unit.gguf_files import PROMPTS


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_smollm2_tokenizer_matches_transformers(smollm2_dir: Path, gguf_tokenizer: Any) -> None:
    """Equal ids on every prompt, except where transformers differs from SmolLM2 itself.

    llama.cpp's `smollm` pre-tokenizer (like SmolLM2's own tokenizer.json) splits digits off
    before the GPT-2 regex; transformers' GGUF loader does not, so on whitespace before a digit
    ("x  123") they differ. There we match transformers given SmolLM2's real pre-tokenizer.
    """
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    reference = Tokenizer.from_str(gguf_tokenizer.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for prompt in PROMPTS:
        ids = ours.encode(prompt).ids
        assert ids == reference.encode(prompt).ids, prompt
        if not re.search(r"\s\s\d", prompt):
            assert ids == gguf_tokenizer(prompt).input_ids, prompt
        assert ours.decode(ids, skip_special_tokens=False) == prompt
    assert ours.encode("x  1").ids != gguf_tokenizer("x  1").input_ids  # the known difference
    assert ours.get_vocab_size() == 49152


def test_smollm2_tokenizer_config(smollm2_dir: Path, gguf_tokenizer: Any) -> None:
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    chat = [{"role": "user", "content": "What is 2+2?"}]
    text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == gguf_tokenizer.apply_chat_template(chat, tokenize=False,
                                                      add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_smollm2_config(smollm2_dir: Path) -> None:
    hf = json.loads((smollm2_dir / "config.json").read_text())
    config = ModelConfig.from_hf(hf)
    assert (config.model_type, config.num_layers, config.hidden_size, config.num_heads,
            config.num_kv_heads, config.head_dim, config.intermediate_size, config.vocab_size) == (
        "llama", 30, 576, 9, 3, 64, 1536, 49152)
    assert (config.rope_theta, config.rms_norm_eps, config.tie_word_embeddings) == (1e5, 1e-5, True)
    assert (config.bos_token_id, config.eos_token_ids, config.rope_scaling) == (1, (2,), None)
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["torch_dtype"] == "float32"


def test_smollm2_logits_match_transformers_gguf_loader(smollm2_dir: Path,
                                                       smollm2_gguf: Path) -> None:
    """Transformers loading our directory and loading the GGUF itself give the same logits:
    the names, the dequantization and the Q/K un-permutation are all right."""
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    theirs = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent,
                                                  gguf_file=smollm2_gguf.name).eval()
    text = "<|im_start|>user\nWhat is the capital of France? 2+2=<|im_end|>\n<|im_start|>"
    ids = torch.tensor([Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).encode(text).ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-4)
