"""The sliced model against transformers, at tp 1–4 through the in-process communicator."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from model_formats.checkpoint import load_model_config
from shard_svc.mesh.communicator import SingleRank, ThreadGroup
from shard_svc.model import ShardModel, make_batch
from shard_svc.sharding import plan_shard
from shard_svc.weights import load_shard_weights
from tests.checkpoints import tiny_checkpoint

PROMPTS = [[5, 17, 42, 7, 99, 250, 3], [11], [200, 201, 202, 13], [64, 1, 2, 3, 4, 5, 6, 7, 8]]
NEW_TOKENS = 32


def run_ranks(tp: int, fn: Callable[[Any], Any]) -> list[Any]:
    """Call fn(communicator) on tp threads; return each rank's result."""
    if tp == 1:
        return [fn(SingleRank())]
    group = ThreadGroup(tp, timeout_s=60)
    results: list[Any] = [None] * tp
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(group.communicator(rank))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0]
    return results


def greedy_tp(model_dir: Path, tp: int) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Greedy-decode all prompts together; return the tokens and full logits at each step."""
    config = load_model_config(model_dir)

    def rank(comm: Any) -> list[list[torch.Tensor]]:
        plan = plan_shard(config, comm.tp_rank, tp)
        model = ShardModel(config, plan, load_shard_weights(model_dir, config, plan), comm)
        cache = model.new_cache(capacity_tokens=1024, page_size=4)
        steps = [(i, p) for i, p in enumerate(PROMPTS)]
        for i, _ in steps:
            cache.add(i)
        local_logits = []
        for _ in range(NEW_TOKENS + 1):
            logits = model.local_logits(model.forward(make_batch(steps, cache), cache))
            local_logits.append(logits)
            # Every rank needs the chosen token: reduce the argmax through the mesh itself.
            full = gather_vocab(comm, logits, plan.vocab_range, config.vocab_size)
            steps = [(i, [int(t)]) for i, t in enumerate(full.argmax(-1))]
        return local_logits

    per_rank = run_ranks(tp, rank)
    steps_logits = [torch.cat([r[s] for r in per_rank], dim=-1) for s in range(NEW_TOKENS + 1)]
    tokens = [[int(s[i].argmax()) for s in steps_logits[:-1]] for i in range(len(PROMPTS))]
    return tokens, [[s[i] for s in steps_logits] for i in range(len(PROMPTS))]


def gather_vocab(comm: Any, local: torch.Tensor, vocab_range: tuple[int, int],
                 vocab: int) -> torch.Tensor:
    """Test-only: assemble full logits on every rank by summing zero-padded slices."""
    full = torch.zeros(local.shape[0], vocab)
    full[:, vocab_range[0]:vocab_range[1]] = local
    return comm.all_reduce(full)


def reference(model_dir: Path) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers: greedy tokens from generate, and logits at every position of the result."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, logits = [], []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 attention_mask=torch.ones_like(ids))
            tokens.append(out[0, len(p):].tolist())
            logits.append(model(out).logits[0, len(p) - 1:])  # [NEW_TOKENS + 1, V]
    return tokens, logits


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, Any]:
    path = tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return path, reference(path)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_logits_and_greedy_equal_transformers(checkpoint: tuple[Path, Any], tp: int) -> None:
    path, (ref_tokens, ref_logits) = checkpoint
    tokens, logits = greedy_tp(path, tp)
    assert tokens == ref_tokens
    for ours, ref in zip(logits, ref_logits, strict=True):
        diff = (torch.stack(ours) - ref).abs().max().item()
        assert diff <= 1e-4, f"max abs logit difference {diff}"
