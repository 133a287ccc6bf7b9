"""Tiny random-weight checkpoints, written by transformers' own classes (the reference)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_checkpoint(path: Path, arch: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Save a small random model of `arch` ("llama" or "qwen2") to `path`; return `path`.

    Shapes are chosen so that every split is uneven somewhere: 6 query / 2 KV heads,
    intermediate 200, vocabulary 301. Weights are scaled up from the usual init so that logits
    are well separated and greedy decoding is not decided by rounding.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    params: dict[str, Any] = dict(
        vocab_size=301, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.15,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    if arch == "llama":
        params["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}
        cls_cfg, cls_model = LlamaConfig, LlamaForCausalLM
    elif arch == "qwen2":
        params["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
        cls_cfg, cls_model = Qwen2Config, Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    params.update(overrides)
    torch.manual_seed(seed)
    model = cls_model(cls_cfg(**params)).eval()
    with torch.no_grad():  # transformers initialises biases and norms to constants: randomise
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(path, safe_serialization=True)
    return path
