"""A GGUF served at its own precision: Q4_0 / Q4_1 / Q4_K blocks read as int4 codes that equal
gguf-py's dequantization, Q8_0 requantized per row, and the model (tp 1 and 2) agreeing with the
same file expanded to float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from model_formats.checkpoint import load_model_config
from model_formats.gguf.convert import GGUF_LINK, convert_gguf
from model_formats.gguf.tensors import GGUFTensors
from shard_svc.quant import INT4
from shard_svc.sharding import plan_shard
from shard_svc.weights import load_shard_weights
from tests.unit.gguf_files import hf_model, write_gguf
from tests.unit.test_half_precision import agreement, cpumesh_top1
from tests.unit.test_model import PROMPTS, greedy_tp

# Q4_K needs K in 256s: hidden 256, intermediate 512; head_dim 32
SHAPES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, head_dim=32)
TYPES = {"self_attn.q_proj": Q.Q4_0, "self_attn.k_proj": Q.Q4_0, "self_attn.v_proj": Q.Q4_1,
         "self_attn.o_proj": Q.Q4_1, "mlp.gate_proj": Q.Q4_K, "mlp.up_proj": Q.Q4_K,
         "mlp.down_proj": Q.Q4_0, "model.embed_tokens": Q.Q8_0}


@pytest.fixture(scope="module")
def linked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("gguf")
    model, weights = hf_model(tmp / "hf", "llama", **SHAPES)
    types = {name: t for name in weights for part, t in TYPES.items() if part in name}
    gguf = write_gguf(tmp / "m.gguf", "llama", model.config.to_dict(), weights,
                      tensor_types=types)
    out = convert_gguf(gguf, tmp / "linked", link=True)
    assert (out / GGUF_LINK).is_symlink() and not (out / "model.safetensors").exists()
    return out


def test_q4_blocks_become_int4_codes_equal_to_gguf_dequantization(linked: Path) -> None:
    reader = GGUFTensors(linked / GGUF_LINK)
    for name, (rows, cols) in {"self_attn.q_proj": ((32, 160), None),  # permuted Q rows
                               "self_attn.v_proj": (None, None),
                               "self_attn.o_proj": (None, (128, 256)),  # a column split
                               "mlp.gate_proj": ((0, 256), None)}.items():
        full = f"model.layers.1.{name}.weight"
        codes = reader.read_codes(full, "int4", 64, rows, cols)
        assert codes.group == 32 and "its own blocks" in reader.served[full]
        reference = reader.read(full, torch.float32, rows, cols)  # gguf-py's dequantize
        assert torch.allclose(codes.dequantize(), reference, rtol=1e-5, atol=1e-6), name


def test_q8_0_is_requantized_per_row_within_its_step(linked: Path) -> None:
    reader = GGUFTensors(linked / GGUF_LINK)
    name = "model.embed_tokens.weight"  # (served in bf16; here the Q8_0 tensor at hand)
    codes = reader.read_codes(name, "int8", 0, (0, 160), (128, 256))
    reference = reader.read(name, torch.float32, (0, 160), (128, 256))
    assert reader.served[name] == "Q8_0 -> int8 (requantized per row)"
    assert ((codes.dequantize() - reference).abs()
            <= codes.scales[:, None] * (0.5 + 1e-4)).all()


def test_served_at_its_own_precision_agrees_with_the_float_expansion(linked: Path) -> None:
    """The int4 model (the layers' Q4 blocks as they are) and the int8 model (them quantized per
    row) against the same file expanded to float32, teacher-forced on float32's greedy tokens,
    tp 1 and 2 (tp 2 splits O's Q4_1 columns at 128: within its blocks; both agree with
    transformers-free float32 as bf16 activations allow, see test_quant.TINY_AGREEMENT)."""
    config = load_model_config(linked)
    served = load_shard_weights(linked, config, plan_shard(config, 1, 2), INT4).served
    assert "Q4_K -> int4 g32 (its own blocks) x4" in served  # gate and up of both layers
    assert "Q4_1 -> int4 g32 (its own blocks)" in served
    assert "Q4_0 -> int4 g32 (its own blocks) x6" in served  # Q, K, down
    tokens = [t[:12] for t in greedy_tp(linked, 1)[0]]  # float32's greedy continuations
    seqs = [p + t for p, t in zip(PROMPTS, tokens, strict=True)]
    greedy = [x for t in tokens for x in t]
    # int4: the layers' blocks exactly; int8 rounds their 4-bit grid again per row; both with
    # bf16 activations and the Q8_0 embedding requantized per row. This random model decides
    # many tokens by rounding (bf16 alone: 0.958); a fault lands near chance (1/301).
    for dtype, least in ((INT4, 0.8), (torch.int8, 0.8)):
        for tp in (1, 2):
            ours = cpumesh_top1(linked, dtype, "auto", seqs, tp)
            assert agreement(ours, greedy) >= least, (dtype, tp, agreement(ours, greedy))
