"""The shard's own model (shard_svc/model.py) stepped through decode, with the plain kernels or the
IPEX backend's (`plan_for`: real IPEX in test_ipex_real.py, a fake of its API in
test_ipex_fake.py), for tests that compare the two paths' logits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model_formats.checkpoint import load_model_config
from shard_svc.ipex_backend import IpexPlan
from shard_svc.kernels import KernelPlan, choose_kernels
from shard_svc.model import ShardModel, make_batch
from shard_svc.sharding import plan_shard
from shard_svc.weights import ShardWeights, load_shard_weights
from tests.unit.test_model import PROMPTS, gather_vocab, run_ranks


def decode_logits(model_dir: Path, dtype: torch.dtype, seqs: list[list[int]], tp: int,
                  plan_for: Callable[[KernelPlan], IpexPlan] | None = None,
                  weights_hook: Callable[[ShardWeights], None] | None = None,
                  kv_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Prefill each of PROMPTS, then feed the tokens of `seqs` (prompt + continuation) one
    decode step at a time, all sequences together; the full logits [B, V] of each step.
    `plan_for` None: the plain kernels; else the kernels `plan_for(plain kernels)`; `kv_dtype`:
    the KV cache's (default: the activations')."""
    config = load_model_config(model_dir)
    steps_n = min(len(s) - len(p) for p, s in zip(PROMPTS, seqs, strict=True))

    def rank(comm: Any) -> list[torch.Tensor]:
        shard = plan_shard(config, comm.tp_rank, tp)
        weights = load_shard_weights(model_dir, config, shard, dtype)
        if weights_hook is not None:
            weights_hook(weights)
        plain = choose_kernels("onednn", dtype, [])
        kernels = plain if plan_for is None else plan_for(plain)
        model = ShardModel(config, shard, weights, comm, kernels)
        cache = model.new_cache(capacity_tokens=1024, page_size=4, kv_dtype=kv_dtype)
        steps = [(i, p) for i, p in enumerate(PROMPTS)]
        out = []
        for t in range(steps_n):
            local = model.local_logits(model.forward(make_batch(steps, cache), cache))
            out.append(gather_vocab(comm, local, shard.vocab_range, config.vocab_size))
            steps = [(i, [s[len(p) + t]]) for i, (p, s) in enumerate(zip(PROMPTS, seqs,
                                                                          strict=True))]
        return out

    return run_ranks(tp, rank)[0]


def top1(logits: list[torch.Tensor]) -> list[int]:
    """Each step's greedy token, in transformers_top1's order: each sequence's steps."""
    return [int(s[i].argmax()) for i in range(len(PROMPTS)) for s in logits]
