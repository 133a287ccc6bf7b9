"""config.json → ModelConfig: the families we run, and clear refusals of the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_formats.checkpoint import load_model_config
from services.config import ModelConfig
from services.errors import CheckpointError

LLAMA3 = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}


def test_llama3_with_rope_scaling_transformers4_layout() -> None:
    c = ModelConfig.from_hf(LLAMA3)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.group_size) == (32, 8, 64, 4)
    assert c.rope_theta == 500000.0 and c.rope_scaling is not None
    assert c.rope_scaling.factor == 32.0 and c.rope_scaling.original_max_position_embeddings == 8192
    assert c.eos_token_ids == (128001, 128008, 128009) and c.tie_word_embeddings
    assert not c.attention_bias


def test_transformers5_rope_parameters_layout() -> None:
    hf = dict(LLAMA3)
    del hf["rope_theta"], hf["rope_scaling"]
    hf["rope_parameters"] = {**LLAMA3["rope_scaling"], "rope_theta": 500000.0}
    assert ModelConfig.from_hf(hf) == ModelConfig.from_hf(LLAMA3)


def test_qwen2_has_qkv_bias_and_mistral_loads() -> None:
    qwen = {**LLAMA3, "model_type": "qwen2", "rope_scaling": None, "eos_token_id": 151645}
    c = ModelConfig.from_hf(qwen)
    assert c.attention_bias and c.rope_scaling is None and c.eos_token_ids == (151645,)
    mistral = {**LLAMA3, "model_type": "mistral", "rope_scaling": None, "sliding_window": None}
    assert ModelConfig.from_hf(mistral).model_type == "mistral"


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
     "unsupported architecture 'gpt2'"),
    ({"model_type": "mistral", "rope_scaling": None, "sliding_window": 4096},
     "sliding_window=4096 is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling 'yarn'"),
    ({"num_key_value_heads": 5}, "num_heads 32 is not a multiple of num_kv_heads 5"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
])
def test_refusals(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**LLAMA3, **change})


def test_model_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA3, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match="unsupported architecture 'bert'"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model_config(tmp_path)
