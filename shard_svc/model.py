"""One tensor-parallel slice of a Llama / Qwen2 decoder, in plain torch, read top to bottom.

Letters used in shape comments:
  N  tokens in the step (all sequences' new tokens, packed)     B  sequences in the step
  H  hidden size         D  head dim        I  local intermediate size
  Hq local query heads   Hkv local KV heads  V  local vocabulary (this rank's slice)
  T  new tokens of one sequence             L  tokens of one sequence in the cache

Column-parallel: Q, K, V, gate and up (split by output: heads, intermediate). Row-parallel: O and
down (split by input), each followed by exactly one all-reduce through the `Communicator`. Norms,
residuals and the embedding lookup are computed redundantly, identically, on every rank.

Given the IPEX backend's kernels (shard_svc/ipex_backend.py), the model calls its fused RMSNorm,
rotary and paged decode attention in place of the plain functions at the bottom of this file:
the choice is made once, when the model is built (decode attention: over a float KV cache only).
Without IPEX, decode attention over a float KV cache is the C++ kernel of
shard_svc/decode_attention.py where it builds (`slot_decode`), else SDPA.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from services.config import ModelConfig
from shard_svc import decode_attention, huge_pages
from shard_svc.ipex_backend import IpexPlan, block_tables
from shard_svc.kernels import KernelPlan, choose_kernels
from shard_svc.kv_cache import KVCache, Reservation
from shard_svc.mesh.communicator import Communicator, TimedCommunicator
from shard_svc.sharding import ShardPlan
from shard_svc.top_k import top_k_lse
from shard_svc.weights import LayerWeights, ShardWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's place in a packed step."""

    seq_id: int
    start: int  # first of its new tokens in the packed N
    stop: int
    cached: int  # tokens already in the cache before this step


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor  # int64 [N]
    positions: torch.Tensor  # int64 [N]
    write_slots: torch.Tensor  # int64 [N]
    spans: tuple[SeqSpan, ...]  # [B]
    last: torch.Tensor  # int64 [B]: index in N of each sequence's last new token
    reservation: Reservation  # the cache room this step took; `undo()` if the step fails
    # A decode step: each sequence's history by slot and its length (the C++ decode attention
    # reads them in place). Without it, short histories attend as one padded batch (one gather
    # of at most PADDED_MAX_SLOTS slots per layer beats B separate calls: `padding_mask` set);
    # longer ones read views per span.
    padded_slots: torch.Tensor | None = None  # int64 [B, Lmax], padding repeats a real slot
    history: torch.Tensor | None = None  # int64 [B]: tokens of each sequence in the cache
    padding_mask: torch.Tensor | None = None  # additive [B, 1, 1, Lmax]: -inf on padding
    # A decode batch read by the backend's paged attention: each sequence's pages and length
    block_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # int32 [B, pages], [B]


PADDED_MAX_SLOTS = 4096


def make_batch(steps: Sequence[tuple[int, Sequence[int]]], cache: KVCache) -> Batch:
    """Reserve cache room for each (seq_id, new token ids) and lay the step out packed.

    The caller has checked the ids and the room; a sequence not in the cache is added, and only
    the tokens after its prefix found in the prefix cache are computed (attending to it).
    """
    reservation = cache.reserve(steps)
    tokens: list[int] = []
    positions: list[torch.Tensor] = []
    spans: list[SeqSpan] = []
    n = 0
    for (seq_id, all_ids), skip in zip(steps, reservation.cached, strict=True):
        ids = all_ids[skip:]  # [T]
        cached = cache.length(seq_id) - len(ids)
        tokens.extend(ids)
        positions.append(torch.arange(cached, cached + len(ids)))
        spans.append(SeqSpan(seq_id, n, n + len(ids), cached))
        n += len(ids)
    padded_slots = history = padding_mask = None
    lengths = [cache.length(seq_id) for seq_id, _ in steps]
    if n == len(spans):  # decode
        longest, history = max(lengths), torch.tensor(lengths)
        padded_slots = torch.stack([F.pad(cache.slots(s, 0, length), (0, longest - length),
                                          value=int(cache.slots(s, 0, 1)))
                                    for (s, _), length in zip(steps, lengths, strict=True)])
        if len(spans) > 1 and len(spans) * longest <= PADDED_MAX_SLOTS:
            padding_mask = torch.zeros(len(spans), 1, 1, longest, dtype=cache.dtype).masked_fill(
                torch.arange(longest).view(1, 1, 1, -1) >= history.view(-1, 1, 1, 1),
                float("-inf"))
    return Batch(torch.tensor(tokens, dtype=torch.int64), torch.cat(positions),
                 torch.cat(reservation.writes), tuple(spans),
                 torch.tensor([s.stop - 1 for s in spans], dtype=torch.int64), reservation,
                 padded_slots, history, padding_mask)


class ShardModel:
    def __init__(self, config: ModelConfig, plan: ShardPlan, weights: ShardWeights,
                 comm: Communicator, kernels: KernelPlan | IpexPlan | None = None) -> None:
        if comm.tp_size != plan.tp_size or comm.tp_rank != plan.tp_rank:
            raise ValueError(f"communicator is rank {comm.tp_rank}/{comm.tp_size}, "
                             f"plan is rank {plan.tp_rank}/{plan.tp_size}")
        self.config, self.plan = config, plan
        self.comm = TimedCommunicator(comm)  # time spent in all_reduce, for the step's report
        self.dtype = weights.embed.dtype
        self.kernels = kernels or choose_kernels(
            "auto", self.dtype, [layer.gate_up for layer in weights.layers])
        self.w = huge_pages.adopt(self.kernels.prepare(weights))  # as the kernels read them
        # The backend's fused kernels where it has them (IPEX), else the plain functions below
        ipex = self.kernels if isinstance(self.kernels, IpexPlan) else None
        self.rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = (
            ipex.rms_norm if ipex else rms_norm)
        self.apply_rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = (
            partial(ipex.apply_rope, q_heads=plan.num_q_heads) if ipex else apply_rope)
        self.paged_decode = ipex.attend_decode if ipex else None
        # else decode reads the cache in place by the C++ kernel where it builds (float KV)
        self.slot_decode = None if ipex else decode_attention.kernel(config.head_dim)
        self.inv_freq = rope_inv_freq(config)  # float32 [D/2]
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def new_cache(self, capacity_tokens: int, page_size: int = 16, prefix_cache: bool = True,
                  kv_dtype: torch.dtype | None = None) -> KVCache:
        """kv_dtype: how K and V are stored (default: the activations' dtype; torch.int8)."""
        if self.paged_decode is not None and kv_dtype == torch.int8:
            log.info("IPEX paged attention reads a float KV cache: with an int8 KV cache, "
                     "decode attends through the plain path")
        return KVCache(num_layers=self.config.num_layers, num_kv_heads=self.plan.num_kv_heads,
                       head_dim=self.config.head_dim, capacity_tokens=capacity_tokens,
                       page_size=page_size, dtype=kv_dtype or self.dtype,
                       compute_dtype=self.dtype, prefix_cache=prefix_cache)

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: KVCache) -> torch.Tensor:
        """Run the step; return each sequence's last hidden state after the final norm, [B, H]."""
        self.kernels.for_step(len(batch.tokens))
        if self.paged_decode is not None:
            batch = with_block_tables(batch, cache)
        x = self.kernels.embedding(batch.tokens, self.w.embed)  # [N, H]
        cos, sin = rope_cos_sin(self.inv_freq, batch.positions, self.dtype)  # [N, D] each
        eps = self.config.rms_norm_eps
        for i, layer in enumerate(self.w.layers):
            h = self.rms_norm(x, layer.input_norm, eps)
            x = x + self.comm.all_reduce(self.attention(i, layer, h, cos, sin, batch, cache))
            h = self.rms_norm(x, layer.post_norm, eps)
            x = x + self.comm.all_reduce(self.mlp(layer, h))
        return self.rms_norm(x[batch.last], self.w.final_norm, eps)

    def attention(self, index: int, w: LayerWeights, h: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, batch: Batch, cache: KVCache) -> torch.Tensor:
        """This rank's heads; returns the O-projection partial sum, [N, H]."""
        n, d = h.shape[0], self.config.head_dim
        hq, hkv = self.plan.num_q_heads, self.plan.num_kv_heads
        qkv = self.kernels.linear(h, w.qkv, w.qkv_bias)  # [N, (Hq + 2 Hkv) * D]
        qk = self.apply_rope(qkv[:, :(hq + hkv) * d].view(n, hq + hkv, d), cos, sin)  # one rotation
        q, k = qk[:, :hq], qk[:, hq:]  # [N, Hq, D], [N, Hkv, D]
        v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)  # [N, Hkv, D]
        cache.write(index, batch.write_slots, k, v)  # into the cache's [Hkv, P*S, D] rows
        q = cache.rotate_queries(q)  # in the basis the cache returns K in
        q = q.reshape(n, hkv, hq // hkv, d)  # [N, Hkv, G, D]: each KV head's query heads
        if batch.block_tables is not None:  # decode, N == B, by the backend's paged attention
            assert self.paged_decode is not None
            o = self.paged_decode(q, *cache.layer(index), *batch.block_tables, cache.page_size,
                                  self.scale)
        elif (self.slot_decode is not None and batch.history is not None
              and cache.k.dtype == q.dtype):  # decode, N == B, the history read in place
            o = self.slot_decode(q, *cache.layer(index), batch.padded_slots, batch.history,
                                 self.scale)
        elif batch.padding_mask is not None:  # decode, N == B: one padded batch
            o = self.attend_padded(index, q, cache, batch)
        else:
            o = self.attend_each(index, q, cache, batch)
        return self.kernels.linear(o.reshape(n, -1), w.wo)  # [N, H]

    def attend_padded(self, index: int, q: torch.Tensor, cache: KVCache,
                      batch: Batch) -> torch.Tensor:
        """A decode batch as one padded batch: q [B, Hkv, G, D] → [B, Hkv, G, D]."""
        assert batch.padded_slots is not None
        b, longest = batch.padded_slots.shape
        hkv, d = q.shape[1], q.shape[3]
        k_rows, v_rows = cache.select(index, batch.padded_slots.view(-1))  # [Hkv, B*Lmax, D]
        ks = k_rows.view(hkv, b, longest, d).transpose(0, 1)
        vs = v_rows.view(hkv, b, longest, d).transpose(0, 1)
        return F.scaled_dot_product_attention(q, ks, vs,  # ks, vs: [B, Hkv, Lmax, D]
                                              attn_mask=batch.padding_mask, scale=self.scale)

    def attend_each(self, index: int, q: torch.Tensor, cache: KVCache,
                    batch: Batch) -> torch.Tensor:
        """Each sequence on its own, its history read as a view of the cache:
        q [N, Hkv, G, D] → [N, Hkv, G, D]."""
        _, hkv, group, d = q.shape
        out = torch.empty_like(q)
        for span in batch.spans:
            t = span.stop - span.start
            qs = q[span.start:span.stop].permute(1, 2, 0, 3)  # [Hkv, G, T, D]
            ks, vs = cache.history(index, span.seq_id)  # [Hkv, L, D] each
            mask = None
            if t > 1:  # query i sits at position cached + i and sees keys 0..cached + i
                mask = causal_mask(t, span.cached, self.dtype).repeat(group, 1)  # [G*T, L]
            o = F.scaled_dot_product_attention(
                qs.reshape(1, hkv, group * t, d), ks.unsqueeze(0), vs.unsqueeze(0),
                attn_mask=mask, scale=self.scale)  # [1, Hkv, G*T, D]
            out[span.start:span.stop] = o.view(hkv, group, t, d).permute(2, 0, 1, 3)
        return out

    def mlp(self, w: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU on this rank's intermediate slice; returns the down-projection partial,
        [N, H]."""
        gate, up = self.kernels.linear(h, w.gate_up).chunk(2, dim=-1)  # [N, I] each
        return self.kernels.linear(F.silu(gate) * up, w.w_down)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's vocabulary slice, float32 [B, V]. They never leave the shard."""
        return self.kernels.linear(hidden, self.w.lm_head).float()

    def top_k(self, logits: torch.Tensor, k: int, temperature: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sequence: the k best (logit, global token id) of this rank's logits [B, V] and
        their log-sum-exp, plain and of logits / temperature (float32 [B], > 0).

        Returns values float32 [B, k], ids int64 [B, k], lse and lse_t float32 [B].
        """
        values, index, lse, lse_t = top_k_lse(logits, min(k, logits.shape[-1]), temperature)
        start = self.plan.vocab_range[0]  # (rank 0's ids are global already: no op in its step)
        return values, index + start if start else index, lse, lse_t


def with_block_tables(batch: Batch, cache: KVCache) -> Batch:
    """A decode step over a float KV cache with its block tables (for paged attention); any
    other step as it is."""
    if len(batch.tokens) != len(batch.spans) or cache.k.dtype == torch.int8:
        return batch
    tables = block_tables(cache, [span.seq_id for span in batch.spans])
    return dataclasses.replace(batch, block_tables=tables, padded_slots=None, history=None,
                               padding_mask=None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def causal_mask(t: int, cached: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [T, cached + T]: 0 where query i may see key j (j <= cached + i)."""
    i = torch.arange(t).unsqueeze(1)
    j = torch.arange(cached + t).unsqueeze(0)
    return torch.zeros(t, cached + t, dtype=dtype).masked_fill(j > cached + i, float("-inf"))


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies, float32 [D/2], with Llama 3 scaling when configured."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)  # [N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [N, D], Hugging Face's rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D]; cos, sin [N, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
