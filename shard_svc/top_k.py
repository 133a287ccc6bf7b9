"""What a step returns of each row of its logits: the k best (logit, id) and the log-sum-exps the
router samples with (`ShardModel.top_k`). By the C++ kernel of shard_svc/csrc/top_k.cpp where it
builds (two passes over each row: SmolLM2's 49152 logits 41 us against torch's topk and
logsumexp, 133 us; 2 threads, AMD EPYC), else by torch; torch also for a row holding a NaN
and for k above KERNEL_MAX_K (the kernel keeps the k best by insertion)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from shard_svc import native

KERNEL_MAX_K = 64
_kernel: list[bool] = []


def top_k_lse(logits: Tensor, k: int, temperature: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits float32 [B, V], 1 <= k <= V, temperature float32 [B] (> 0): values [B, k] largest
    first, their ids [B, k] (int64, within the row), log-sum-exp [B] of each row and of each
    row / temperature."""
    if (k <= KERNEL_MAX_K and logits.dim() == 2 and logits.dtype == temperature.dtype
            == torch.float32 and kernel()):
        out = torch.ops.cpumesh_kernels.top_k_lse(logits, k, temperature)
        if not any(math.isnan(v) for v in out[2].tolist()):  # (tensor ops: ~70 us in a step)
            return out
    values, ids = torch.topk(logits, k, dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    lse_t = (lse if bool((temperature == 1).all())  # greedy and plain sampling: the same
             else torch.logsumexp(logits / temperature.unsqueeze(1), dim=-1))
    return values, ids, lse, lse_t


def kernel() -> bool:
    """Whether the C++ kernel runs here (built once, shard_svc/native.py)."""
    if not _kernel:
        _kernel.append(native.load() is not None)
    return _kernel[0]
