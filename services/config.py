"""Frozen configuration, validated once at the entry point.

`ModelConfig` describes one decoder-only transformer of the Llama or Qwen2 family, read from a
Hugging Face `config.json`. Llama and Qwen2 differ only by fields (QKV bias, rope theta, tied
embeddings), never by subclasses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# model_type → does the family put a bias on Q, K and V?
SUPPORTED_MODEL_TYPES: dict[str, bool] = {"llama": False, "mistral": False, "qwen2": True}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent rope scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture {self.model_type!r}; "
                f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dictionary; refuse what we cannot run."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES:
            named = model_type or (archs[0] if archs else "<none>")
            raise ValueError(
                f"unsupported architecture {named!r} (architectures={archs}); "
                f"cpumesh runs: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            )
        if model_type == "mistral" and hf.get("sliding_window") not in (None, 0):
            window = hf["sliding_window"]
            if window < hf.get("max_position_embeddings", 0):
                raise ValueError(f"mistral with sliding_window={window} is not supported")
        if hf.get("use_sliding_window"):
            raise ValueError(f"{model_type} with use_sliding_window=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; only silu")
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(_rope_param(hf, "rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(hf),
            attention_bias=bool(hf.get("attention_bias", SUPPORTED_MODEL_TYPES[model_type])),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _rope_param(hf: dict[str, Any], key: str, default: Any) -> Any:
    """transformers 5 moves rope settings into `rope_parameters`; 4.x keeps them top level."""
    params = hf.get("rope_parameters") or {}
    return params.get(key, hf.get(key, default))


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling {rope_type!r}; only llama3")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )
