"""Tiny GGUF files for the conversion tests, written as llama.cpp's convert_hf_to_gguf.py
writes them: from a tiny Hugging Face model's float weights, with a small byte-level BPE
vocabulary."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter, quants
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tests.checkpoints import tiny_checkpoint

PROMPTS = ["Hello world", "The year 2024 had 366 days.", "x  123 y", "  1", " 2024-11-29 12:30",
           "def f(x):\n    return x**2  # square\n", "for (int i = 0; i < n; ++i) { a[i] = 0; }",
           "你好，世界！今天天气很好。", "日本語のテキスト", "한국어 문장입니다", "مرحبا بالعالم",
           "नमस्ते दुनिया", "🤗🚀 emoji 👍🏽 👨‍👩‍👧", "\t\n  \n\n   ", "   leading and trailing   ",
           "line\r\nbreaks\r\n", "Ünïcödé naïve café", "e\u0301 combining", "zero\u200bwidth",
           "<|im_start|>user\nhi<|im_end|>\n", "don't won't I'll", "a<tool>b<|endoftext|>", ""]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}")
HF_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# max |error| / max |weight| allowed per type: half a quantization step plus scale rounding
# (Q4_0 clips the far end of its asymmetric range [-8d, 7d]: up to an eighth of the block max)
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 4e-3, Q.Q8_0: 6e-3, Q.Q6_K: 0.03,
             Q.Q4_0: 0.13, Q.Q4_1: 0.075, Q.Q4_K: 0.1}


@functools.cache
def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """301 byte-level BPE tokens (3 control, 1 user-defined `<tool>`), their types and merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=301, special_tokens=[*SPECIALS, "<tool>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([p * 20 for p in PROMPTS] + ["the quick brown fox"] * 50, trainer)
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, [3, 3, 3, 4] + [1] * (len(tokens) - 4), merges


def _quantize_k(x: np.ndarray, qtype: Q) -> np.ndarray:
    """Q4_K / Q6_K blocks in ggml's layout (gguf-py can only dequantize these)."""
    n, f16 = x.size // 256, np.float16
    safe = lambda a: np.where(a == 0, 1, a)  # noqa: E731
    if qtype == Q.Q6_K:
        b = x.reshape(n, 16, 16)
        sub = np.abs(b).max(-1) / 31
        d = (sub.max(-1, keepdims=True) / 127).astype(f16)
        sc = np.round(sub / safe(d.astype(np.float32))).astype(np.int8)
        q = np.round(b / safe(d.astype(np.float32) * sc)[..., None]).clip(-32, 31) + 32
        q = q.astype(np.uint8).reshape(n, 2, 4, 32)  # (half, quarter, l) of each 256 block
        ql = np.concatenate([(q[:, :, 0] & 15) | (q[:, :, 2] << 4),
                             (q[:, :, 1] & 15) | (q[:, :, 3] << 4)], axis=-1)
        qh = sum(q[:, :, j] >> 4 << (2 * j) for j in range(4)).astype(np.uint8)
        parts = [ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d.view(np.uint8)]
    else:
        b = x.reshape(n, 8, 32)
        mn = np.maximum(-b.min(-1), 0)
        scale = (b.max(-1) + mn) / 15
        d, dmin = ((a.max(-1, keepdims=True) / 63).astype(f16) for a in (scale, mn))
        sc = np.round(scale / safe(d.astype(np.float32))).clip(0, 63).astype(np.uint8)
        m = np.round(mn / safe(dmin.astype(np.float32))).clip(0, 63).astype(np.uint8)
        off = (dmin.astype(np.float32) * m)[..., None]
        q = np.round((b + off) / safe(d.astype(np.float32) * sc)[..., None]).clip(0, 15)
        q = q.astype(np.uint8)
        scales = [sc[:, :4] | (sc[:, 4:] >> 4 << 6), m[:, :4] | (m[:, 4:] >> 4 << 6),
                  (sc[:, 4:] & 15) | (m[:, 4:] << 4)]
        qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)
        parts = [d.view(np.uint8), dmin.view(np.uint8), *scales, qs]
    return np.concatenate(parts, axis=1).reshape(x.shape[0], -1)


def write_gguf(path: Path, arch: str, cfg: dict[str, Any], weights: dict[str, np.ndarray],
               qtype: Q = Q.F32, pre: str = "smollm", rope_freqs: np.ndarray | None = None,
               tensor_types: dict[str, Q] | None = None) -> Path:
    """A GGUF file as llama.cpp's convert_hf_to_gguf.py writes it (names, Q/K permutation)."""
    heads, kv_heads, head_dim = (cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                 cfg["head_dim"])
    w = GGUFWriter(path, arch)
    for add, value in [("block_count", cfg["num_hidden_layers"]),
                       ("context_length", cfg["max_position_embeddings"]),
                       ("embedding_length", cfg["hidden_size"]), ("head_count", heads),
                       ("feed_forward_length", cfg["intermediate_size"]),
                       ("head_count_kv", kv_heads), ("layer_norm_rms_eps", cfg["rms_norm_eps"]),
                       ("rope_freq_base", cfg["rope_parameters"]["rope_theta"]),
                       ("rope_dimension_count", head_dim), ("tokenizer_model", "gpt2"),
                       ("tokenizer_pre", pre), ("bos_token_id", 1), ("eos_token_id", 2),
                       ("add_bos_token", False), ("chat_template", TEMPLATE)]:
        getattr(w, f"add_{add}")(value)
    tokens, types, merges = tiny_vocab()
    w.add_token_list(tokens), w.add_token_types(types), w.add_token_merges(merges)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, array in weights.items():
        m = re.fullmatch(r"(?:model\.layers\.(\d+)\.)?(.+)\.(weight|bias)", name)
        assert m is not None
        gguf_name = (f"blk.{m[1]}." if m[1] else "") + f"{HF_TO_GGUF[m[2]]}.{m[3]}"
        if arch == "llama" and m[2] in ("self_attn.q_proj", "self_attn.k_proj"):
            n = heads if m[2] == "self_attn.q_proj" or heads == kv_heads else kv_heads
            array = array.reshape(n, 2, array.shape[0] // n // 2, *array.shape[1:])
            array = array.swapaxes(1, 2).reshape(weights[name].shape)  # llama.cpp's permute
        t = (tensor_types or {}).get(name, qtype)
        if array.ndim == 1 or t == Q.F32:
            w.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
        elif t in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(gguf_name, _quantize_k(array, t), raw_dtype=t)
        elif t in TOLERANCE:
            w.add_tensor(gguf_name, quants.quantize(array, t), raw_dtype=t)
        else:  # a type gguf-py cannot write: zero blocks of the right size
            block, size = GGML_QUANT_SIZES[t]
            w.add_tensor(gguf_name, np.zeros((array.shape[0], array.shape[1] // block * size),
                                             np.uint8), raw_dtype=t)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return path


def hf_model(path: Path, arch: str, **overrides: Any) -> tuple[Any, dict[str, np.ndarray]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(path, arch, **overrides)).eval()
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight")
    return model, weights


def llama3_rope_freqs(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """The per-frequency factors llama.cpp stores for Llama 3 rope scaling (LlamaModel)."""
    wl = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    old, low, high = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                      rope["high_freq_factor"])
    smooth = (old / wl - low) / (high - low)
    return np.where(wl < old / high, 1.0, np.where(wl > old / low, rope["factor"],
                                                   1 / ((1 - smooth) / rope["factor"] + smooth)))


def assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}")]
