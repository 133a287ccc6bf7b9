"""Half precision (bfloat16, float16) with each kernel library, against transformers in the same
dtype: teacher-forced top-1 agreement over the float32 greedy continuations, at tp 1 and 2; and
the same under AVX2 emulation (the CPUs we serve on differ)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from model_formats.checkpoint import load_model_config
from services.errors import InvalidArgument
from shard_svc.kernels import choose_kernels, packs
from shard_svc.model import ShardModel, make_batch
from shard_svc.sharding import plan_shard
from shard_svc.weights import load_shard_weights
from tests.avx2_child import AVX2_ENV
from tests.checkpoints import tiny_checkpoint
from tests.unit.test_model import PROMPTS, gather_vocab, run_ranks

NEW_TOKENS = 24
AGREEMENT = 0.95


def continuations(model_dir: Path) -> list[list[int]]:
    """Prompt + float32 greedy continuation, from transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               attention_mask=torch.ones(1, len(p), dtype=torch.int64))[0].tolist()
                for p in PROMPTS]


def transformers_top1(model_dir: Path, dtype: torch.dtype, seqs: list[list[int]]) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    out = []
    with torch.no_grad():
        for p, s in zip(PROMPTS, seqs, strict=True):
            out += model(torch.tensor([s])).logits[0, len(p) - 1:-1].argmax(-1).tolist()
    return out


def cpumesh_top1(model_dir: Path, dtype: torch.dtype, library: str, seqs: list[list[int]],
                 tp: int = 1) -> list[int]:
    """Prefill each prompt, then feed the reference tokens one decode step at a time."""
    config = load_model_config(model_dir)

    def rank(comm: Any) -> list[torch.Tensor]:
        plan = plan_shard(config, comm.tp_rank, tp)
        weights = load_shard_weights(model_dir, config, plan, dtype)
        model = ShardModel(config, plan, weights, comm,
                           choose_kernels(library, dtype, [x.gate_up for x in weights.layers]))
        cache = model.new_cache(capacity_tokens=1024, page_size=4)
        steps = [(i, p) for i, p in enumerate(PROMPTS)]
        top = []
        for t in range(tokens):
            local = model.local_logits(model.forward(make_batch(steps, cache), cache))
            assert torch.isfinite(local).all()
            top.append(gather_vocab(comm, local, plan.vocab_range, config.vocab_size).argmax(-1))
            pairs = enumerate(zip(PROMPTS, seqs, strict=True))
            steps = [(i, [s[len(p) + t]]) for i, (p, s) in pairs]
        return top

    tokens = len(seqs[0]) - len(PROMPTS[0])  # NEW_TOKENS for `continuations`
    top = run_ranks(tp, rank)[0]  # [tokens] of [B]
    return [int(top[t][i]) for i in range(len(PROMPTS)) for t in range(tokens)]


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, list[list[int]]]:
    path = tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return path, continuations(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("library", ["aten", "onednn", "packed"])
def test_half_precision_agrees_with_transformers(checkpoint: tuple[Path, list[list[int]]],
                                                 dtype: torch.dtype, library: str) -> None:
    path, seqs = checkpoint
    if library == "packed" and not packs(dtype):  # this CPU: oneDNN cannot pack (no AVX-512)
        with pytest.raises(InvalidArgument, match="cannot pack"):
            choose_kernels(library, dtype, [])
        return
    theirs = transformers_top1(path, dtype, seqs)
    for tp in (1, 2):
        ours = cpumesh_top1(path, dtype, library, seqs, tp)
        assert agreement(ours, theirs) >= AGREEMENT, (tp, agreement(ours, theirs))


def test_float32_kernel_libraries_equal_transformers(
        checkpoint: tuple[Path, list[list[int]]]) -> None:
    path, seqs = checkpoint
    greedy = [t for p, s in zip(PROMPTS, seqs, strict=True) for t in s[len(p):]]
    for library in ("aten", "onednn", "packed"):
        assert cpumesh_top1(path, torch.float32, library, seqs) == greedy


SCRIPT = """
import json, sys, torch
from pathlib import Path
from tests.unit.test_half_precision import cpumesh_top1, agreement
torch.set_num_threads(2)
path, seqs, theirs = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {f"{d}-{lib}": agreement(cpumesh_top1(path, getattr(torch, d), lib, seqs), theirs[d])
       for d in ("bfloat16", "float16") for lib in ("aten", "onednn", "auto")}
from services.errors import InvalidArgument
from shard_svc.kernels import choose_kernels, packs
try:
    choose_kernels("packed", torch.bfloat16, [])
    refused = ""
except ValueError as e:
    refused = str(e)
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "refused": refused,
                  **out}))
"""


def test_half_precision_under_avx2_emulation(checkpoint: tuple[Path, list[list[int]]]) -> None:
    path, seqs = checkpoint
    theirs = {d: transformers_top1(path, getattr(torch, d), seqs) for d in ("bfloat16", "float16")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path), json.dumps(seqs), json.dumps(theirs)],
        env={**os.environ, **AVX2_ENV}, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[2], check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result.pop("capability") == "AVX2"
    # oneDNN packs half-precision weights only with AVX-512 or avx_ne_convert: a clear refusal
    assert "cannot pack torch.bfloat16 weights on this CPU" in result.pop("refused")
    assert all(a >= AGREEMENT for a in result.values()), result


def test_shard_refuses_packed_where_onednn_cannot_pack(tmp_path: Path) -> None:
    """`cpumesh shard --kernels packed` on a CPU without AVX-512 (emulated): one line, exit 1."""
    path = tiny_checkpoint(tmp_path / "tiny", "llama")
    cpumesh = Path(sys.executable).parent / "cpumesh"
    out = subprocess.run(
        [str(cpumesh), "shard", "--model-dir", str(path), "--kernels", "packed", "--dtype",
         "bfloat16", "--listen", "127.0.0.1:0", "--peers", "127.0.0.1:45999"],
        env={**os.environ, **AVX2_ENV}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "cpumesh shard: error: kernels 'packed': oneDNN cannot pack torch.bfloat16 weights on "
        "this CPU (AVX2); use auto, aten or onednn"]
