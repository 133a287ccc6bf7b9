"""Tiny tokenizer model directories for the tokenizer tests, trained here with `tokenizers` in well
under a second, and checks that each one exercises what it is built for.

* `byte_level`: GPT-2 style byte-level BPE with ChatML special tokens, the chat template in
  `chat_template.jinja` (default system prompt, `raise_exception` on unknown roles, `<|im_end|>`
  ending turns while `<|endoftext|>` is the EOS), and a model vocabulary in config.json padded
  beyond the tokenizer's.
* `byte_fallback`: Llama-2 style sentencepiece BPE with byte-fallback tokens `<0x00>`..`<0xFF>`
  (characters outside its small alphabet become bytes), BOS added by `add_bos_token`, a
  `clean_up_tokenization_spaces` that transformers ignores for BPE, and a Llama-2 chat template
  in tokenizer_config.json using `bos_token`/`eos_token`.
* `unigram`: a sentencepiece unigram model with cleanup of tokenization spaces on and no chat
  template.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def square(x):\n    return x ** 2  # the square\n",
    "for (int i = 0; i < n; ++i) { total += a[i]; }",
    "I don't think it's a problem, isn't it? We're fine, you've seen.",
    "日本語のテキスト、漢字とかな。你好，世界！",
    "مرحبا بالعالم",
    "emoji 🤗🚀 👍🏽 👨‍👩‍👧 done",
    "  leading spaces and trailing  \t\n\n",
    "numbers 1234567890 and 3.14159, dates 2024-11-29",
]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = false %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system != false %}"
    "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def _lines() -> list[str]:
    return [line for _ in range(20) for line in CORPUS]


def _write(directory: Path, tokenizer: Tokenizer, config: dict, model: dict | None = None,
           generation: dict | None = None, template: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    for name, data in (("config.json", model), ("generation_config.json", generation)):
        if data is not None:
            (directory / name).write_text(json.dumps(data))
    if template is not None:
        (directory / "chat_template.jinja").write_text(template)
    return directory


def build_byte_level(directory: Path) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_lines(), trainer)
    size = tokenizer.get_vocab_size()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": {"content": "<|endoftext|>", "special": True, "__type": "AddedToken"},
              "clean_up_tokenization_spaces": False, "model_max_length": 2048}
    return _write(directory, tokenizer, config,
                  model={"model_type": "llama", "vocab_size": size + 12, "eos_token_id": 0},
                  generation={"eos_token_id": [0]}, template=CHATML_TEMPLATE)


def build_byte_fallback(directory: Path) -> Path:
    tokenizer = Tokenizer(models.BPE())  # trained on words, as sentencepiece trains
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, limit_alphabet=70)
    tokenizer.train_from_iterator(_lines(), trainer)
    trained = json.loads(tokenizer.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *BYTE_TOKENS])}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True,
                                     fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False, "clean_up_tokenization_spaces": True,
              "chat_template": LLAMA2_TEMPLATE}
    return _write(directory, tokenizer, config)


def build_unigram(directory: Path) -> Path:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tokenizer.train_from_iterator(_lines(), trainer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>", "clean_up_tokenization_spaces": True}
    return _write(directory, tokenizer, config)


BUILDERS = {"byte_level": build_byte_level, "byte_fallback": build_byte_fallback,
            "unigram": build_unigram}


def test_byte_fallback_model_uses_byte_tokens(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_file(str(build_byte_fallback(tmp_path) / "tokenizer.json"))
    tokens = tokenizer.encode("한국 🎉").tokens
    assert tokens[0] == "<s>"
    assert sum(t in BYTE_TOKENS for t in tokens) >= 10, tokens
    assert tokenizer.decode(tokenizer.encode("한국 🎉").ids, skip_special_tokens=True) == "한국 🎉"


def test_byte_level_model_splits_characters_across_tokens(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_file(str(build_byte_level(tmp_path) / "tokenizer.json"))
    ids = tokenizer.encode("🤗 ok").ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some token is part of a char
    assert tokenizer.decode(ids) == "🤗 ok"
