"""ShardModel calling the IPEX plan's hooks where shard_svc/model.py calls its plain functions:
`rms_norm`, `apply_rope` and, for a decode step, `attend_decode` (block tables made once per
step). Test-only until model.py calls the hooks itself (the integration the IPEX backend's
docstring describes); everything else is ShardModel's own code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model_formats.checkpoint import load_model_config
from shard_svc.ipex_backend import IpexPlan, block_tables
from shard_svc.kernels import KernelPlan, choose_kernels
from shard_svc.kv_cache import KVCache
from shard_svc.model import Batch, ShardModel, make_batch, rope_cos_sin
from shard_svc.sharding import plan_shard
from shard_svc.weights import LayerWeights, ShardWeights, load_shard_weights
from tests.unit.test_model import PROMPTS, gather_vocab, run_ranks


class IpexShardModel(ShardModel):
    kernels: IpexPlan  # type: ignore[assignment]

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: KVCache) -> torch.Tensor:
        self.kernels.for_step(len(batch.tokens))
        self.tables = None
        if len(batch.tokens) == len(batch.spans):  # decode: one query per sequence
            self.tables = block_tables(cache, [s.seq_id for s in batch.spans])
        norm, eps = self.kernels.rms_norm, self.config.rms_norm_eps
        x = F.embedding(batch.tokens, self.w.embed)  # [N, H]
        cos, sin = rope_cos_sin(self.inv_freq, batch.positions, self.dtype)  # [N, D] each
        for i, layer in enumerate(self.w.layers):
            h = norm(x, layer.input_norm, eps)
            x = x + self.comm.all_reduce(self.attention(i, layer, h, cos, sin, batch, cache))
            h = norm(x, layer.post_norm, eps)
            x = x + self.comm.all_reduce(self.mlp(layer, h))
        return norm(x[batch.last], self.w.final_norm, eps)

    def attention(self, index: int, w: LayerWeights, h: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, batch: Batch, cache: KVCache) -> torch.Tensor:
        n, d = h.shape[0], self.config.head_dim
        hq, hkv = self.plan.num_q_heads, self.plan.num_kv_heads
        qkv = self.kernels.linear(h, w.qkv, w.qkv_bias)  # [N, (Hq + 2 Hkv) * D]
        qk = self.kernels.apply_rope(qkv[:, :(hq + hkv) * d].view(n, hq + hkv, d), cos, sin, hq)
        q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
        k_cache, v_cache = cache.layer(index)  # [Hkv, P*S, D] each
        k_cache.index_copy_(1, batch.write_slots, k.transpose(0, 1))
        v_cache.index_copy_(1, batch.write_slots, v.transpose(0, 1))
        q = q.reshape(n, hkv, hq // hkv, d)  # [N, Hkv, G, D]
        if self.tables is not None:
            tables, lengths = self.tables
            o = self.kernels.attend_decode(q, k_cache, v_cache, tables, lengths,
                                           cache.page_size, self.scale)
        else:
            o = self.attend_each(index, q, cache, batch)
        return self.kernels.linear(o.reshape(n, -1), w.wo)


def decode_logits(model_dir: Path, dtype: torch.dtype, seqs: list[list[int]], tp: int,
                  plan_for: Callable[[KernelPlan], IpexPlan] | None = None,
                  weights_hook: Callable[[ShardWeights], None] | None = None
                  ) -> list[torch.Tensor]:
    """Prefill each of PROMPTS, then feed the tokens of `seqs` (prompt + continuation) one
    decode step at a time, all sequences together; the full logits [B, V] of each step.
    `plan_for` None: the plain ShardModel; else IpexShardModel with `plan_for(plain plan)`."""
    config = load_model_config(model_dir)
    steps_n = min(len(s) - len(p) for p, s in zip(PROMPTS, seqs, strict=True))

    def rank(comm: Any) -> list[torch.Tensor]:
        shard = plan_shard(config, comm.tp_rank, tp)
        weights = load_shard_weights(model_dir, config, shard, dtype)
        if weights_hook is not None:
            weights_hook(weights)
        plain = choose_kernels("onednn", dtype, [])
        model = (ShardModel(config, shard, weights, comm, plain) if plan_for is None else
                 IpexShardModel(config, shard, weights, comm, plan_for(plain)))  # type: ignore[arg-type]
        cache = model.new_cache(capacity_tokens=1024, page_size=4)
        steps = [(i, p) for i, p in enumerate(PROMPTS)]
        out = []
        for t in range(steps_n):
            local = model.local_logits(model.forward(make_batch(steps, cache), cache))
            out.append(gather_vocab(comm, local, shard.vocab_range, config.vocab_size))
            steps = [(i, [s[len(p) + t]]) for i, (p, s) in enumerate(zip(PROMPTS, seqs,
                                                                          strict=True))]
        return out

    return run_ranks(tp, rank)[0]
