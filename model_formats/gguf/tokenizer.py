"""A `tokenizers` tokenizer rebuilt from a GGUF file's vocabulary metadata.

A GGUF file carries no `tokenizer.json`: llama.cpp stores the vocabulary, merges, token types and
special token ids as `tokenizer.ggml.*` metadata. Two families are rebuilt here:

* `gpt2`: byte-level BPE (SmolLM2, Llama 3, Qwen2). The pre-tokenizer split is chosen by
  `tokenizer.ggml.pre`, with llama.cpp's own regular expressions for each name.
* `llama`: sentencepiece-style BPE with byte fallback (Llama 2, Mistral). Merges come from the
  file, or are recovered from the token scores when the file has none.

Tokens typed CONTROL (and UNKNOWN) become special added tokens, USER_DEFINED ones plain added
tokens, so both are matched whole in text as llama.cpp does.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp token types (`llama_token_type`)
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# `tokenizer.ggml.pre` → the regular expressions llama.cpp splits with, applied in order.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "gpt-2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "falcon3": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
}


class TokenizerBuildError(ValueError):
    """The GGUF vocabulary metadata is missing, inconsistent or of an unsupported kind."""


def build_tokenizer(meta: dict[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    """`(tokenizer, tokenizer_config)` from a GGUF file's `tokenizer.*` metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise TokenizerBuildError("no vocabulary (tokenizer.ggml.tokens) in the file")
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerBuildError(f"{len(types)} token types for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # a repeated spelling keeps its first id, as llama.cpp does
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    special = {name: _token(meta, tokens, key) for name, key in
               (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    if kind == "gpt2":
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=False))
        tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        tokenizer.decoder = decoders.ByteLevel()
    elif kind == "llama":
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        if not merges:
            merges = _merges_from_scores(tokens, types, meta.get("tokenizer.ggml.scores"), vocab)
        tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=special["unk_token"],
                                         byte_fallback=True, fuse_unk=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * prefix)
    else:
        raise TokenizerBuildError(
            f"unsupported tokenizer model {kind!r} (tokenizer.ggml.model); supported: gpt2, llama")

    tokenizer.add_special_tokens([
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(types) if t in (CONTROL, UNKNOWN) and vocab[tokens[i]] == i])
    tokenizer.add_tokens([
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(types) if t == USER_DEFINED and vocab[tokens[i]] == i])
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(vocab):
        raise TokenizerBuildError("special tokens do not fit the vocabulary")  # never expected

    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tokenizer.post_processor = _post_processor(tokens, meta, add_bos, add_eos)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _context_length(meta),
    }
    if (template := meta.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    return tokenizer, config


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    # Files written before llama.cpp recorded `tokenizer.ggml.pre` are treated as GPT-2.
    splits = PRE_TOKENIZER_SPLITS.get(pre or "gpt-2")
    if splits is None:
        raise TokenizerBuildError(
            f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
            f"supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
    return pre_tokenizers.Sequence(
        [*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float] | None,
                        vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Sentencepiece files list no merges: every split of a token into two tokens is a merge,
    ranked by the merged token's score (best first), then by the longer left piece."""
    if scores is None or len(scores) != len(tokens):
        raise TokenizerBuildError("a sentencepiece vocabulary without merges needs token scores")
    found: list[tuple[float, int, int, str, str]] = []
    for index, token in enumerate(tokens):
        if types[index] != 1:  # only NORMAL tokens are reached by merging
            continue
        pairs = [(token[:k], token[k:]) for k in range(1, len(token))]
        pairs = sorted((p for p in pairs if p[0] in vocab and p[1] in vocab),
                       key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend((-scores[index], -len(left), -len(right), left, right)
                     for left, right in pairs)
    found.sort(key=lambda f: f[:3])  # stable: equal keys keep vocabulary order
    return [(f[3], f[4]) for f in found]


def _post_processor(tokens: list[str], meta: dict[str, Any], add_bos: bool,
                    add_eos: bool) -> processors.PostProcessor:
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    bos = [(tokens[bos_id], bos_id)] if add_bos and bos_id is not None else []
    eos = [(tokens[eos_id], eos_id)] if add_eos and eos_id is not None else []
    first = " ".join([f"{t}:0" for t, _ in bos] + ["$A:0"] + [f"{t}:0" for t, _ in eos])
    second = " ".join([f"{t}:1" for t, _ in bos] + ["$B:1"] + [f"{t}:1" for t, _ in eos])
    return processors.TemplateProcessing(
        single=first, pair=f"{first} {second}", special_tokens=list(dict.fromkeys(bos + eos)))


def _token(meta: dict[str, Any], tokens: list[str], key: str) -> str | None:
    index = meta.get(f"tokenizer.ggml.{key}")
    if index is None:
        return None
    if not 0 <= index < len(tokens):
        raise TokenizerBuildError(f"tokenizer.ggml.{key}={index} is outside the vocabulary")
    return tokens[index]


def _context_length(meta: dict[str, Any]) -> int | None:
    arch = meta.get("general.architecture")
    return meta.get(f"{arch}.context_length")
