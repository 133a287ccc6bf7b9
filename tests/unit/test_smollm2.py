"""The real SmolLM2-135M-Instruct, converted by our converter, against transformers reading the
same GGUF file itself: identical greedy tokens, at tp 1 and tp 2 (9 query heads split 6 + 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from model_formats.checkpoint import load_model_config
from shard_svc.model import ShardModel, make_batch
from shard_svc.sharding import plan_shard
from shard_svc.weights import load_shard_weights
from tests.unit.test_model import gather_vocab, run_ranks

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Résumé: 東京 is a city where 🍣 is"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def reference(smollm2_gguf: Path) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and greedy continuations from transformers loading the GGUF itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32).eval()
    prompts, outputs = [], []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text, return_tensors="pt").input_ids
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            prompts.append(ids[0].tolist())
            outputs.append(out[0, ids.shape[1]:].tolist())
    return prompts, outputs


def greedy(model_dir: Path, tp: int, prompts: list[list[int]]) -> list[list[int]]:
    config = load_model_config(model_dir)

    def rank(comm: Any) -> list[list[int]]:
        plan = plan_shard(config, comm.tp_rank, tp)
        model = ShardModel(config, plan, load_shard_weights(model_dir, config, plan), comm)
        cache = model.new_cache(capacity_tokens=512)
        steps: list[tuple[int, list[int]]] = list(enumerate(prompts))
        for i, _ in steps:
            cache.add(i)
        tokens: list[list[int]] = [[] for _ in prompts]
        for _ in range(NEW_TOKENS):
            logits = model.local_logits(model.forward(make_batch(steps, cache), cache))
            full = gather_vocab(comm, logits, plan.vocab_range, config.vocab_size)
            steps = [(i, [int(t)]) for i, t in enumerate(full.argmax(-1))]
            for i, t in steps:
                tokens[i].append(t[0])
        return tokens

    results = run_ranks(tp, rank)
    assert all(r == results[0] for r in results), "ranks disagree"
    return results[0]


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_equals_transformers_on_the_gguf(smollm2_dir: Path, reference: Any,
                                                 tp: int) -> None:
    prompts, expected = reference
    assert greedy(smollm2_dir, tp, prompts) == expected


def top1_forced(model_dir: Path, dtype: torch.dtype, prompts: list[list[int]],
                continuations: list[list[int]]) -> list[int]:
    """cpumesh's top-1 at every position of the float32 continuation (teacher-forced)."""
    config = load_model_config(model_dir)
    plan = plan_shard(config, 0, 1)
    from shard_svc.mesh.communicator import SingleRank

    model = ShardModel(config, plan, load_shard_weights(model_dir, config, plan, dtype),
                       SingleRank())
    cache = model.new_cache(capacity_tokens=512)
    steps: list[tuple[int, list[int]]] = list(enumerate(prompts))
    top: list[list[int]] = [[] for _ in prompts]
    for t in range(NEW_TOKENS):
        best = model.local_logits(model.forward(make_batch(steps, cache), cache)).argmax(-1)
        for i, b in enumerate(best.tolist()):
            top[i].append(b)
        steps = [(i, [c[t]]) for i, c in enumerate(continuations)]
    return [t for row in top for t in row]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_agrees_with_transformers_in_the_same_dtype(
        smollm2_dir: Path, smollm2_gguf: Path, reference: Any, dtype: torch.dtype) -> None:
    """Over the float32 greedy continuations: transformers (reading the GGUF itself, in `dtype`)
    and cpumesh (in `dtype`) pick the same top-1 at >= 95% of positions, and cpumesh's top-1
    equals the float32 continuation at >= 95% too."""
    from transformers import AutoModelForCausalLM

    prompts, expected = reference
    theirs_model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=dtype).eval()
    theirs = []
    with torch.no_grad():
        for p, c in zip(prompts, expected, strict=True):
            logits = theirs_model(torch.tensor([p + c])).logits[0, len(p) - 1:-1]
            theirs += logits.argmax(-1).tolist()
    ours = top1_forced(smollm2_dir, dtype, prompts, expected)
    flat = [t for row in expected for t in row]
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours)
    with_f32 = sum(a == b for a, b in zip(ours, flat, strict=True)) / len(ours)
    print(f"{dtype}: top-1 agreement with transformers {agree:.3f}, with float32 {with_f32:.3f}")
    assert agree >= 0.95 and with_f32 >= 0.95, (agree, with_f32)
