"""Decode attention read in place from the KV cache: a C++ kernel (shard_svc/csrc/
decode_attention.cpp), built at shard start for the vector ISA inductor compiles for, and
registered as the op `cpumesh_kernels::decode_attention`, which compiled decode graphs and
eager decode steps (`ShardModel.slot_decode`) call over a float KV cache.

Why: a compiled step used to gather each row's history out of the paged cache (a copy of K and
V per layer) and hand the copy to scaled_dot_product_attention, whose CPU kernel is slow for
one query token (its matrix products have G = Hq / Hkv rows). Measured on SmolLM2's shapes
(30 layers, 3 KV heads x 3 query heads, D = 64, bfloat16, 2 threads, AMD EPYC with AVX-512):
at 4096 tokens of context the gather + SDPA took 36.8 ms a step, SDPA on views of the cache
17.5, this kernel 4.4 (~21 GB/s of K and V); at 128 tokens 1.7 / 1.0 / 0.3 ms.

`load(head_dim)` returns the ISA the kernels were built for (shard_svc/native.py builds them),
or None, logged with why, where the kernel cannot run: no C++ kernels here, head_dim not a
supported multiple of the vector width. The caller then keeps SDPA (over a gathered history in
a compiled graph).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from shard_svc import native

log = logging.getLogger("cpumesh.shard")
OP = "cpumesh_kernels::decode_attention"
VECTORS = (1, 2, 4, 5, 6, 8, 10, 12, 16)  # head sizes compiled, in vectors (kVectors in C++)


def supports(head_dim: int, vector_width: int) -> bool:
    """Whether the kernel is compiled for this head size on an ISA of `vector_width` floats."""
    return head_dim % vector_width == 0 and head_dim // vector_width in VECTORS


def load(head_dim: int | None = None) -> str | None:
    """The ISA the kernel runs on here (built once, shard_svc/native.py), or None (logged) when
    it cannot run here, or not for `head_dim`."""
    built = native.load()
    if not built:
        return None
    width = native.vector_isa().floats
    if head_dim is not None and not supports(head_dim, width):
        log.warning("decode attention: head_dim %d is not %s vectors of %d floats (%s); "
                    "gather + SDPA", head_dim, VECTORS, width, built)
        return None
    _register_fake()
    return built


def _register_fake() -> None:
    if getattr(_register_fake, "done", False):
        return

    @torch.library.register_fake(OP)
    def _(q: Tensor, k: Tensor, v: Tensor, index: Tensor, lengths: Tensor,
          scale: float) -> Tensor:
        return q.new_empty(q.shape)

    _register_fake.done = True  # type: ignore[attr-defined]


def kernel(head_dim: int) -> Callable[..., Tensor] | None:
    """`decode_attention` where the kernel builds for this head size here, else None."""
    return decode_attention if load(head_dim) else None


def decode_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, lengths: Tensor,
                     scale: float) -> Tensor:
    """q [B, Hkv, G, D]; k, v [Hkv, slots, D] (a layer's cache); index int64 [B, L]: row b's
    history at slots index[b, :lengths[b]]; returns [B, Hkv, G, D] in q's dtype."""
    return torch.ops.cpumesh_kernels.decode_attention(q, k, v, index, lengths, scale)
