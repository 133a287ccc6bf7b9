"""Weight-only int8 / int4: codes against a numpy reference, the two products against float64,
and whole tiny models (tp 1 and 2) against transformers running the dequantized weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from shard_svc.quant import INT4, INT4_GROUP, finish, quantize_int4, quantize_int8
from shard_svc.quant_groups import fits, quantize_int8_groups
from shard_svc.quant_linear import (
    DEQUANTIZE,
    INT8_KERNEL,
    WEIGHT_ONLY,
    int8_group_kernel,
    quant_linear,
)
from tests.avx2_child import AVX2_ENV
from tests.checkpoints import tiny_checkpoint
from tests.unit.test_half_precision import (
    agreement,
    continuations,
    cpumesh_top1,
    transformers_top1,
)
from tests.unit.test_model import PROMPTS

# int4-friendly shapes: every K divides by 32 or 64 and every fused matrix's rows by 16 at tp 1/2
SHAPES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8)
TOKENS = 24  # teacher-forced after each prompt: 96 positions, so one near-tie moves 1 %
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def numpy_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.maximum(np.abs(w).max(axis=1) / 127, 1e-12)
    return np.clip(np.rint(w / s[:, None]), -127, 127), s


def numpy_int4(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = g.min(-1), g.max(-1)
    s = np.maximum((hi - lo) / 15, 1e-12)
    q = np.clip(np.rint((g - lo[..., None]) / s[..., None]), 0, 15)
    return q.reshape(w.shape), s, lo + 8 * s


def test_int8_codes_match_numpy_and_error_is_half_a_step() -> None:
    w = torch.randn(48, 160) * torch.rand(48, 1) * 3
    codes = quantize_int8(w)
    q, s = numpy_int8(w.double().numpy())
    assert np.allclose(codes.scales.numpy(), s, rtol=1e-6)
    assert (codes.q.numpy() != q).mean() < 1e-3  # float32 vs float64 ties only
    err = (codes.dequantize() - w).abs()
    assert (err <= codes.scales[:, None] * (0.5 + 1e-4)).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_codes_match_numpy_and_error_is_half_a_step(group: int) -> None:
    w = torch.randn(32, 256) + torch.linspace(-1, 1, 256)
    codes = quantize_int4(w, group)
    q, s, z = numpy_int4(w.double().numpy(), group)
    assert codes.group == group
    assert np.allclose(codes.scales.numpy(), s, rtol=1e-5)
    assert np.allclose(codes.zeros.numpy(), z, rtol=1e-5, atol=1e-6)
    assert (codes.q.numpy() != q).mean() < 1e-3
    step = codes.scales.repeat_interleave(group, dim=1)
    assert ((codes.dequantize() - w).abs() <= step * (0.5 + 1e-4)).all()


@pytest.mark.parametrize(("kind", "width"), [("int8", 256), ("int8", 100), ("int8", 104),
                                             ("int4", 256)])
@pytest.mark.parametrize("method", [INT8_KERNEL, WEIGHT_ONLY, DEQUANTIZE])
@pytest.mark.parametrize("tokens", [1, 8, 130])
def test_products_equal_float64_on_the_dequantized_weight(kind: str, width: int, method: str,
                                                          tokens: int) -> None:
    """Both methods compute x @ dequantize(w).T; bf16 (or float32) activations and output. int8
    inputs not a multiple of 16 wide (a row-parallel slice at tp 2 of an intermediate of 200):
    ATen's weight-only kernel gave garbage, NaN or a segmentation fault there."""
    torch.manual_seed(tokens)
    w = torch.randn(192, width)
    codes = quantize_int8(w) if kind == "int8" else quantize_int4(w, 64)
    dtype = torch.bfloat16
    served = finish(codes, dtype)
    x = torch.randn(tokens, width).to(dtype)
    bias = torch.randn(192).to(dtype)
    want = x.double() @ codes.dequantize().double().T + bias.double()
    got = quant_linear(x, served, bias, method).double()
    # bf16 output: 2^-8 relative, plus the bf16 scales' rounding (2^-9 of each product)
    assert (got - want).abs().max() <= 0.01 * want.abs().max()


def dequantized_checkpoint(src: Path, dst: Path, kind: str) -> Path:
    """`src` with every layer matrix replaced by its quantize → dequantize (tp 1 slicing), and
    the embedding and LM head by their int8 per row; "int8g" (what `--dtype int8` serves where
    cpumesh's kernels build): int8 in groups of 32, the embedding too where its rows come in
    16s (SHAPES' matrices all take groups)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    for name, t in tensors.items():
        grouped = kind == "int8g" and fits(*t.shape) if t.dim() == 2 else False
        if any(f"{n}.weight" in name for n in LINEARS):
            codes = (quantize_int8_groups(t) if grouped else quantize_int8(t) if "int8" in kind
                     else quantize_int4(t, INT4_GROUP))
            tensors[name] = codes.dequantize().to(t.dtype)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            codes = quantize_int8_groups(t) if grouped else quantize_int8(t)
            tensors[name] = codes.dequantize().to(t.dtype)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, list[list[int]]]:
    """A tiny model and, to teacher-force, each prompt and its first float32 greedy tokens."""
    path = tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, **SHAPES)
    return path, [s[:len(p) + TOKENS] for p, s in zip(PROMPTS, continuations(path), strict=True)]


# This tiny random model decides some tokens by rounding: transformers in bf16 picks float32's
# top-1 at 0.958 of the positions (llama). A loading or kernel fault lands near chance (1/301).
TINY_AGREEMENT = 0.9


@pytest.mark.parametrize("dtype", [torch.int8, INT4], ids=["int8", "int4"])
def test_quantized_model_agrees_with_transformers_on_dequantized_weights(
        checkpoint: tuple[Path, list[list[int]]], dtype: torch.dtype,
        tmp_path: Path) -> None:
    """Teacher-forced top-1 against transformers running the same dequantized weights in the
    activations' dtype (int4: bf16; int8 in groups: float32), for both methods, at tp 1 and 2,
    and tp 1 against tp 2 (tp 2 quantizes its own slices: the groups split evenly, so the codes
    are the same). How close int8 / int4 stay to float on a real model is test_quality's
    question."""
    path, seqs = checkpoint
    kind = "int4" if dtype == INT4 else "int8g" if int8_group_kernel() else "int8"
    theirs = transformers_top1(dequantized_checkpoint(path, tmp_path / "dq", kind),
                               torch.float32 if kind == "int8g" else torch.bfloat16, seqs)
    ours = {(library, tp): cpumesh_top1(path, dtype, library, seqs, tp)
            for library, tp in (("aten", 1), ("onednn", 1), ("aten", 2))}
    for key, top in ours.items():
        assert agreement(top, theirs) >= TINY_AGREEMENT, key
    assert agreement(ours["aten", 1], ours["aten", 2]) >= TINY_AGREEMENT


def test_kinds_fall_back_where_int4_cannot_go(tmp_path: Path) -> None:
    """The default tiny shapes (hidden 96, intermediate 200 split 100/100): K = 100 has no int4
    group and fused rows not in 16s cannot be packed, so those matrices are int8; it still
    runs and agrees with float32."""
    from model_formats.checkpoint import load_model_config
    from shard_svc.sharding import plan_shard
    from shard_svc.weights import load_shard_weights

    path = tiny_checkpoint(tmp_path / "m")
    config = load_model_config(path)
    w = load_shard_weights(path, config, plan_shard(config, 1, 2), INT4)
    layer: Any = w.layers[0]
    assert type(layer.w_down).__name__ == "Int8Weight"  # K 100
    assert type(layer.qkv).__name__ == "Int4Weight"  # K 96, rows 48: group 32
    assert "-> int8" in w.served and "int4 g32" in w.served


AVX2_SCRIPT = """
import json, sys, torch
from pathlib import Path
from tests.unit.test_half_precision import cpumesh_top1, agreement
from shard_svc.quant import INT4, INT4_GROUP, activations_dtype, int4_block_n
torch.set_num_threads(2)
path, seqs, theirs = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {f"{d}-{lib}": agreement(cpumesh_top1(path, dt, lib, seqs), theirs[d])
       for d, dt in (("int8", torch.int8), ("int4", INT4)) for lib in ("aten", "onednn")}
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "activations": str(activations_dtype()), "block": int4_block_n(), **out}))
"""


def test_quantized_under_avx2_emulation(checkpoint: tuple[Path, list[list[int]]],
                                        tmp_path: Path) -> None:
    """Without AVX-512 the activations are float32 (the kernels' bf16 paths are emulated there),
    the int4 layout is found by its probe, and both methods still compute the model."""
    path, seqs = checkpoint
    theirs = {d: transformers_top1(dequantized_checkpoint(path, tmp_path / k, k), torch.float32,
                                   seqs)  # (the kernels' AVX2 build serves int8 in groups)
              for d, k in (("int8", "int8g"), ("int4", "int4"))}
    out = subprocess.run(
        [sys.executable, "-c", AVX2_SCRIPT, str(path), json.dumps(seqs), json.dumps(theirs)],
        env={**os.environ, **AVX2_ENV}, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[2], check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (result.pop("capability"), result.pop("activations")) == ("AVX2", "torch.float32")
    assert result.pop("block") == 32
    assert all(a >= TINY_AGREEMENT for a in result.values()), result
