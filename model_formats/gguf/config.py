"""The Hugging Face `config.json` of a GGUF file, read from its metadata.

`hf_config` maps the `{arch}.*` and `tokenizer.ggml.*` keys of a `llama` or `qwen2` file onto the
fields every cpumesh loader reads. llama.cpp stores Llama 3 rope scaling only as per-frequency
factors (`rope_freqs.weight`); `_llama3_rope` recovers the parameters that reproduce them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import CheckpointError

# GGUF architecture → Hugging Face class; both families share one tensor layout
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config(src: Path, meta: dict[str, Any], tensors: dict[str, Any],
              dtype: str) -> dict[str, Any]:
    """The config.json contents for `src`; refuses an unsupported architecture or rope."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{src}: unsupported architecture {arch!r}; "
                              f"cpumesh converts {', '.join(ARCHITECTURES)}")

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise CheckpointError(f"{src}: metadata key {arch}.{name} is missing")
        return value

    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{src}: no token_embd.weight tensor")
    heads, hidden = key("attention.head_count"), key("embedding_length")
    head_dim = meta.get(f"{arch}.rope.dimension_count") or hidden // heads
    if meta.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise CheckpointError(f"{src}: rope scaling {meta[f'{arch}.rope.scaling.type']!r} "
                              "is not supported")
    theta = _short(key("rope.freq_base", 1e4))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if "rope_freqs.weight" in tensors:
        rope = _llama3_rope(src, tensors["rope_freqs.weight"].data, theta, head_dim)
    eos = list(dict.fromkeys(meta[k] for k in ("tokenizer.ggml.eos_token_id",
               "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta))
    config = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden, "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads), "head_dim": head_dim,
        "max_position_embeddings": key("context_length", 2048),
        "rms_norm_eps": _short(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope["rope_theta"], "rope_parameters": rope,
        "rope_scaling": None if rope["rope_type"] == "default" else rope,
        "hidden_act": "silu", "attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype, "use_cache": True,
    }
    if arch == "qwen2":
        config["use_sliding_window"] = False
    return config


def _short(value: float) -> float:
    """A float32 from the file as its shortest decimal: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(value)))


def _llama3_rope(src: Path, factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover Llama 3 rope-scaling parameters from the per-frequency factors llama.cpp stores.

    Only `old / low_freq_factor` and `old / high_freq_factor` shape the factors, so `low` is
    fixed at 1; any parameters that reproduce the stored factors give the same model.
    """
    f = np.asarray(factors, dtype=np.float64).reshape(-1)
    wl = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)  # wavelength per frequency
    if f.size == wl.size and np.allclose(f, 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    factor = float(f.max()) if f.size == wl.size else 0.0
    ones, full = f <= 1 + 1e-6, f >= factor * (1 - 1e-6)
    mid = ~ones & ~full
    hi_edge = wl[ones].max() if ones.any() else wl.min() / 2
    lo_edge = wl[full].min() if full.any() else wl.max() * 2
    smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor) if factor > 1 else f[mid]
    if mid.sum() >= 2:
        a, b = np.polyfit(1 / wl[mid], smooth, 1)
        olds = [-a / b] if b < 0 else []
    else:
        olds = list(np.geomspace(wl[mid].max() if mid.any() else hi_edge, lo_edge, 9)[1:-1])
    for old in (float(round(o)) for o in olds):
        if mid.any():
            high = 1 + float(np.mean((old / wl[mid] - 1) / smooth))
        else:
            high = old / math.sqrt(hi_edge * old)
        rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor,
                "low_freq_factor": 1.0, "high_freq_factor": high,
                "original_max_position_embeddings": int(old)}
        if factor > 1 and high > 1 and np.allclose(_llama3_factors(wl, rope), f, rtol=1e-4):
            return rope
    raise CheckpointError(f"{src}: rope_freqs.weight does not follow Llama 3 rope scaling")


def _llama3_factors(wl: np.ndarray, rope: dict[str, Any]) -> np.ndarray:
    old, factor = rope["original_max_position_embeddings"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    smooth = (old / wl - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wl < old / high, 1.0, np.where(wl > old / low, factor, between))
