"""The benchmark models: the embedded SmolLM2-135M-Instruct and a random-weight Llama with the
shapes of Llama-3.2-1B, each as a Hugging Face directory, plus their byte counts for the roofline.

The random model is written straight to safetensors, one tensor at a time (never the whole model
in memory), from a seeded generator, into a cache directory reused by later runs.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LLAMA_1B = {  # Llama-3.2-1B's shapes (rope scaling left out: it changes no cost)
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}


@dataclass(frozen=True)
class BenchModel:
    name: str  # short key used in results
    label: str  # as shown in tables
    model_dir: Path

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.model_dir / "config.json").read_text())

    def param_counts(self) -> tuple[int, int]:
        """(parameters read by every decode step: layers, final norm and LM head;
        embedding-table parameters, of which a step reads only one row per token)."""
        c = self.config
        h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        d = c.get("head_dim") or h // c["num_attention_heads"]
        q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        embed = c["vocab_size"] * h
        return layers * per_layer + h + embed, embed  # the LM head reads vocab × H (tied or not)

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        c = self.config
        d = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * d * dtype_bytes

    def step_bytes(self, batch: int, context: int, weight_bytes: float = 4.0) -> float:
        """Bytes one decode step must read: every weight once, and each sequence's KV cache."""
        read, _ = self.param_counts()
        return read * weight_bytes + batch * context * self.kv_bytes_per_token()


def smollm2() -> BenchModel:
    from model_formats.embedded import default_model_dir

    return BenchModel("smollm2-135m", "SmolLM2-135M-Instruct", default_model_dir())


def llama_1b(cache: Path) -> BenchModel:
    path = cache / "llama-1b-random"
    if not (path / "model.safetensors").is_file():
        write_random_llama(path, LLAMA_1B)
    return BenchModel("llama-1b-random", "random Llama-3.2-1B shapes", path)


def write_random_llama(path: Path, config: dict[str, Any], seed: int = 0) -> Path:
    """A random float32 Llama checkpoint (std 0.02, unit norms), streamed tensor by tensor."""
    import torch

    c = config
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    d = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h),
                                          "model.norm.weight": (h,)}
    if not c.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i)}
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * _numel(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset,
                                                                               offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "model.safetensors.tmp"
    g = torch.Generator().manual_seed(seed)
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in shapes.values():
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            f.write(t.numpy().tobytes())
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(path / "model.safetensors")
    return path


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
