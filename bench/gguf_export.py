"""A Hugging Face Llama directory → an F32 or F16 GGUF file for llama.cpp, same weights as ours.

The tokenizer metadata is copied from the embedded SmolLM2 GGUF; a model with a larger
vocabulary (the random 1B) gets it padded with unused placeholder tokens, which llama.cpp never
produces or matches. Q and K rows are permuted into llama.cpp's interleaved rotary layout, as
its own converter does. Norms stay F32 in both types, as in llama.cpp's converter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TYPES = ("F32", "F16")
UNUSED = 5  # llama.cpp token type: never produced, never matched


def export_gguf(model_dir: Path, out: Path, ftype: str = "F32") -> Path:
    """Write `out` once (reused when present); return it."""
    import gguf
    from safetensors import safe_open

    from model_formats.embedded import embedded_gguf_path

    if ftype not in TYPES:
        raise ValueError(f"ftype must be one of {TYPES}, got {ftype!r}")
    if out.is_file():
        return out
    c = json.loads((model_dir / "config.json").read_text())
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or h // heads
    w = gguf.GGUFWriter(str(out) + ".tmp", "llama")
    w.add_name(model_dir.name)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(c.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(c["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    _copy_tokenizer(w, gguf.GGUFReader(embedded_gguf_path()), c["vocab_size"])

    with safe_open(model_dir / "model.safetensors", framework="np") as f:
        names = list(f.keys())
        # Two passes, so that one tensor at a time is in memory (the 1B model is 5 GB): the
        # header lists every tensor's shape and type, then the data follows in the same order.
        for name in names:
            shape = f.get_slice(name).get_shape()
            dtype = np.dtype(np.float16 if ftype == "F16" and len(shape) == 2 else np.float32)
            w.add_tensor_info(_gguf_name(name), shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name in names:
            array = f.get_tensor(name)
            gname = _gguf_name(name)
            if gname.endswith("attn_q.weight"):
                array = _permute(array, heads)
            elif gname.endswith("attn_k.weight"):
                array = _permute(array, kv)
            dtype = np.float16 if ftype == "F16" and array.ndim == 2 else np.float32
            w.write_tensor_data(np.ascontiguousarray(array, dtype=dtype))
        w.close()
    Path(str(out) + ".tmp").rename(out)
    return out


def _copy_tokenizer(w: object, reader: object, vocab: int) -> None:
    import gguf

    for key, field in reader.fields.items():  # type: ignore[attr-defined]
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            value = value + [f"<unused_{i}>" for i in range(len(value), vocab)]
        elif key == "tokenizer.ggml.token_type":
            value = value + [UNUSED] * (vocab - len(value))
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, kind, sub_type=sub)  # type: ignore[attr-defined]


def _gguf_name(name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    _, _, n, *rest = name.split(".")
    part = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}[".".join(rest[:-1])]
    return f"blk.{n}.{part}.weight"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's half-split rotary rows → llama.cpp's interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)
