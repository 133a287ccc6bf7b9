"""GGUF → Hugging Face weights, checked against the float weights the GGUF files came from:
every quantization type within its rounding, F32 exactly (same logits), and the output dtype."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

from model_formats.checkpoint import load_model_config
from model_formats.gguf.convert import convert_gguf
from services.config import ModelConfig
from tests.unit.gguf_files import TOLERANCE, hf_model, llama3_rope_freqs, write_gguf


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
