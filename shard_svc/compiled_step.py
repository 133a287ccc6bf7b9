"""A compiled decode step (`--compile decode`): the same math as `ShardModel.forward`, traced once
per batch-size bucket by torch.compile (inductor), so a step runs a few fused kernels per layer
instead of ~60 eager ops, and no Python between them.

Shapes are static except one: a decode step of B <= 8 sequences is padded to the next bucket
(1, 2, 4, 8 rows; padding rows repeat row 0, and write row 0's K and V into row 0's slot again),
and every sequence's history is read from the paged cache through a gather index [B, L] passed
as an input (L: the longest history, rounded up to a multiple of `CONTEXT_ALIGN`; shorter
histories padded with their own first slot and masked with -inf). L is the one dynamic
dimension (`mark_dynamic`), so the graphs of one batch bucket serve every context length.

Granularity (`granularity`):
  layer  one graph of a decoder layer, the same graph for every layer (its weights and its KV
         layer are inputs), called once per layer: compiles in seconds;
  step   the whole step (embedding, every layer, final norm) as one graph.
The mesh's all-reduce is an opaque custom op (`cpumesh::all_reduce`), so neither is broken
by it; packed oneDNN weights go through `cpumesh::packed_linear` (inductor cannot lower
`mkldnn._linear_pointwise` itself).

Every bucket is compiled at start (`warm_up`, which logs how long); while serving, a step runs
under torch.compiler's "fail_on_recompile" stance: a shape never warmed up falls back to the
eager path (logged), it never compiles. Prefill, batches above the largest bucket, int8 / int4
weights and an int8 KV cache keep the eager path (`accepts`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from shard_svc.kernels import KernelPlan
from shard_svc.kv_cache import KVCache
from shard_svc.kv_store import FloatKV
from shard_svc.mesh.communicator import Communicator, LocalOnly
from shard_svc.model import Batch, ShardModel, apply_rope, rms_norm, rope_cos_sin

log = logging.getLogger("cpumesh.shard")
BATCH_BUCKETS = (1, 2, 4, 8)
CONTEXT_ALIGN = 64
GRANULARITIES = ("layer", "step")
_active = threading.local()  # .comm: the communicator of the step running on this thread


@torch.library.custom_op("cpumesh::all_reduce", mutates_args=())
def mesh_all_reduce(x: Tensor) -> Tensor:
    """Sum x over the ranks of the step's communicator (a copy: ops may not mutate inputs)."""
    comm: Communicator = _active.comm
    with torch.inference_mode():  # as in the eager step: the mesh's buffers are made in it
        return comm.all_reduce(x.contiguous().clone())


@mesh_all_reduce.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("cpumesh::packed_linear", mutates_args=())
def packed_linear(x: Tensor, w: Tensor, b: Tensor | None, out_features: int) -> Tensor:
    """x @ w.T + b with w reordered by oneDNN (shard_svc.kernels.pack)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@packed_linear.register_fake
def _(x: Tensor, w: Tensor, b: Tensor | None, out_features: int) -> Tensor:
    return x.new_empty(x.shape[0], out_features)


class CompiledDecode:
    def __init__(self, model: ShardModel, granularity: str = "layer", mode: str | None = None,
                 buckets: tuple[int, ...] = BATCH_BUCKETS) -> None:
        """mode: torch.compile's (None: its default); buckets: the batch sizes warmed up."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        why = not_compilable(model)
        if why:
            raise ValueError(f"compiled decode: {why}")
        self.model, self.granularity, self.mode = model, granularity, mode
        self.buckets = tuple(sorted(buckets))
        self.graphs = 0  # graphs compiled so far (the backend counts them)
        self.warm: set[int] = set()  # batch buckets compiled
        self.steps = 0  # steps run compiled
        c, p = model.config, model.plan
        self.dims = (c.rms_norm_eps, p.num_q_heads, p.num_kv_heads, c.head_dim, model.scale,
                     p.tp_size > 1, model.kernels.packed)
        fn = self._step if granularity == "step" else self._layer
        self._compiled = torch.compile(fn, backend=self._backend, dynamic=False)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 1024)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Any:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        patches = list_mode_options(self.mode) if self.mode else {}
        # round where eager rounds (half precision): fused kernels otherwise keep float32
        patches["emulate_precision_casts"] = True
        return compile_fx(gm, example_inputs, config_patches=patches)

    # -- which steps ------------------------------------------------------------------------

    def accepts(self, batch: Batch, cache: KVCache) -> bool:
        """A decode step (one new token per sequence) of at most the largest bucket's rows,
        float weights and a float KV cache, every bucket warmed up."""
        b = len(batch.spans)
        return (len(batch.tokens) == b <= self.buckets[-1] and isinstance(cache.store, FloatKV)
                and self.bucket(b) in self.warm)

    # -- running ----------------------------------------------------------------------------

    def forward(self, batch: Batch, cache: KVCache) -> Tensor | None:
        """The step's final hidden states [B, H], as `ShardModel.forward` returns them; None
        when the compiled graphs would have to compile (the caller then runs eager)."""
        lengths = [cache.length(s.seq_id) for s in batch.spans]
        gather = [cache.slots(s.seq_id, 0, n) for s, n in zip(batch.spans, lengths, strict=True)]
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                hidden = self.run(batch.tokens, batch.positions, batch.write_slots, gather,
                                  cache, self.model.comm)
            self.steps += 1
            return hidden
        except RuntimeError as e:
            if "recompil" not in str(e).lower():
                raise
            log.warning("compiled decode: %d rows would recompile; eager step (%s)",
                        len(lengths), str(e).splitlines()[0])
            return None

    @torch.no_grad()
    def run(self, tokens: Tensor, positions: Tensor, write_slots: Tensor,
            gather: list[Tensor], cache: KVCache, comm: Communicator) -> Tensor:
        n = len(tokens)
        rows = self.bucket(n)
        src = torch.cat([torch.arange(n), torch.zeros(rows - n, dtype=torch.int64)])  # [Bb]
        longest = max(len(g) for g in gather)
        width = -(-longest // CONTEXT_ALIGN) * CONTEXT_ALIGN
        index = torch.stack([F.pad(g, (0, width - len(g)), value=int(g[0])) for g in gather])
        lengths = torch.tensor([len(g) for g in gather])
        mask = torch.zeros(n, 1, 1, width, dtype=cache.dtype).masked_fill(
            torch.arange(width).view(1, 1, 1, -1) >= lengths.view(-1, 1, 1, 1), float("-inf"))
        index, mask = index[src], mask[src]  # [Bb, L], [Bb, 1, 1, L]
        torch._dynamo.mark_dynamic(index, 1)
        torch._dynamo.mark_dynamic(mask, 3)
        m = self.model
        m.kernels.for_step(rows)
        _active.comm = comm
        args = (tokens[src], positions[src], write_slots[src], src, index, mask)
        if self.granularity == "step":
            x = self._compiled(*args, m.w.embed, m.inv_freq, m.w.final_norm,
                               [_weights(w) for w in m.w.layers], cache.k, cache.v)
        else:
            x = m.kernels.embedding(args[0], m.w.embed)
            cos, sin = rope_cos_sin(m.inv_freq, args[1], m.dtype)
            for i, layer in enumerate(m.w.layers):
                x = self._compiled(x, cos, sin, *args[2:], cache.k[i], cache.v[i],
                                   _weights(layer))
            x = rms_norm(x, m.w.final_norm, m.config.rms_norm_eps)
        return x[:n]

    def warm_up(self, cache: KVCache) -> float:
        """Compile every batch bucket (on a scratch sequence of the cache, with the sums
        skipped, so a rank warms up alone); return the seconds it took."""
        t0, seq_id = time.monotonic(), -2
        cache.add(seq_id)
        try:
            slot = cache.extend(seq_id, [0])
            for rows in self.buckets:
                t1 = time.monotonic()
                zeros = torch.zeros(rows, dtype=torch.int64)
                self.run(zeros, zeros, slot.repeat(rows), [slot] * rows, cache,
                         LocalOnly(self.model.plan.tp_rank, self.model.plan.tp_size))
                self.warm.add(rows)
                log.info("compiled decode (%s): %d rows warm in %.1f s", self.granularity,
                         rows, time.monotonic() - t1)
        finally:
            cache.release(seq_id)
        return time.monotonic() - t0

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if rows >= 1 and rows <= b)

    # -- the math (traced) ------------------------------------------------------------------

    def _step(self, tokens: Tensor, positions: Tensor, write_slots: Tensor, src: Tensor,
              index: Tensor, mask: Tensor, embed: Tensor, inv_freq: Tensor, final_norm: Tensor,
              layers: list[tuple[Tensor | None, ...]], k: Tensor, v: Tensor) -> Tensor:
        x = F.embedding(tokens, embed)  # [Bb, H]
        cos, sin = rope_cos_sin(inv_freq, positions, embed.dtype)
        for i, w in enumerate(layers):
            x = self._layer(x, cos, sin, write_slots, src, index, mask, k[i], v[i], w)
        return rms_norm(x, final_norm, self.dims[0])

    def _layer(self, x: Tensor, cos: Tensor, sin: Tensor, write_slots: Tensor, src: Tensor,
               index: Tensor, mask: Tensor, k_cache: Tensor, v_cache: Tensor,
               w: tuple[Tensor | None, ...]) -> Tensor:
        """One decoder layer for Bb rows of one token each; K and V of the layer's cache
        [Hkv, P*S, D] written at `write_slots` and read at `index` [Bb, L]."""
        eps, hq, hkv, d, scale, reduce, packed = self.dims
        input_norm, qkv_w, qkv_b, wo, post_norm, gate_up, w_down = w
        assert input_norm is not None and post_norm is not None
        n, width = x.shape[0], index.shape[1]

        def linear(x: Tensor, w: Tensor | None, b: Tensor | None = None) -> Tensor:
            assert w is not None
            return packed_linear(x, w, b, w.shape[0]) if packed else F.linear(x, w, b)

        def all_reduce(x: Tensor) -> Tensor:
            return mesh_all_reduce(x) if reduce else x

        h = rms_norm(x, input_norm, eps)
        qkv = linear(h, qkv_w, qkv_b)  # [Bb, (Hq + 2 Hkv) * D]
        qk = apply_rope(qkv[:, :(hq + hkv) * d].view(n, hq + hkv, d), cos, sin)
        q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
        k_cache.index_copy_(1, write_slots, k[src].transpose(0, 1).to(k_cache.dtype))
        v_cache.index_copy_(1, write_slots, v[src].transpose(0, 1).to(v_cache.dtype))
        flat = index.reshape(-1)
        ks = k_cache.index_select(1, flat).view(hkv, n, width, d).transpose(0, 1)
        vs = v_cache.index_select(1, flat).view(hkv, n, width, d).transpose(0, 1)
        o = F.scaled_dot_product_attention(q.reshape(n, hkv, hq // hkv, d), ks, vs,
                                           attn_mask=mask, scale=scale)  # [Bb, Hkv, G, D]
        x = x + all_reduce(linear(o.reshape(n, -1), wo))
        h = rms_norm(x, post_norm, eps)
        gate, up = linear(h, gate_up).chunk(2, dim=-1)
        return x + all_reduce(linear(F.silu(gate) * up, w_down))


def not_compilable(model: ShardModel) -> str | None:
    """Why this model's decode cannot run compiled (None: it can)."""
    if not isinstance(model.kernels, KernelPlan):
        return f"kernels {type(model.kernels).__name__} are not traced (only KernelPlan's)"
    if model.kernels.quantized:
        return "int8 / int4 weights run eager"
    return None


def compile_decode(model: ShardModel, cache: KVCache) -> CompiledDecode | None:
    """`--compile decode` at shard start: compile and warm every bucket, logged; None (eager,
    logged) when this model or cache cannot run compiled."""
    why = not_compilable(model) or (None if isinstance(cache.store, FloatKV)
                                    else "an int8 KV cache runs eager")
    if why:
        log.warning("--compile decode: %s; every step eager", why)
        return None
    compiled = CompiledDecode(model)
    seconds = compiled.warm_up(cache)
    log.info("compiled decode: buckets %s rows, %d graphs, warm in %.1f s", compiled.buckets,
             compiled.graphs, seconds)
    return compiled


def _weights(layer: Any) -> tuple[Tensor | None, ...]:
    return (layer.input_norm, layer.qkv, layer.qkv_bias, layer.wo, layer.post_norm,
            layer.gate_up, layer.w_down)
