"""A compiled decode step (`--compile decode`): the same math as `ShardModel.forward` and the LM
head, traced once per batch-size bucket by torch.compile (inductor) with the weights frozen into
the graph (shard_svc/frozen_step.py) and `max-autotune`: inductor packs each matrix once, for
its own C++ GEMM kernels (AMX / AVX-512 micro-kernels where the CPU has them), and fuses the
element-wise work around them, so a step is a few fused kernels per layer and no Python.

Shapes are static except one: a decode step of B sequences is padded to the next bucket
(`--compile-rows`, 1 and 8 by default; padding rows repeat row 0, and write row 0's K and V into
row 0's slot again), and every sequence's history in the paged cache is named by a slot index
[B, L] passed as an input with each row's length (L: the longest history, rounded up to a
multiple of `CONTEXT_ALIGN`; shorter histories padded with their own first slot). L is the one
dynamic dimension (`mark_dynamic`), so the graph of one batch bucket serves every context
length. Attention reads the history in place through the index, by the C++ kernel of
shard_svc/decode_attention.py (built at start for inductor's vector ISA; 4096 tokens of context
cost SmolLM2 16.5 ms/step instead of 33.3 through a gather); where it cannot build, the graph
gathers K and V at the index and calls SDPA with the padding masked (-inf). Each layer's K and
V cache is its own input, written in place. The mesh's all-reduce is an opaque custom op
(`cpumesh::all_reduce`), so the graph is not broken by it.

Freezing needs plain weights: the shard then chooses among plain kernels for its eager steps
(prefill), never oneDNN-packed ones. Inductor's packed constants are its own: each compiled
bucket holds one more copy of the weights.

Every bucket is compiled at start (`warm_up`, which logs how long); while serving, a step runs
under torch.compiler's "fail_on_recompile" stance: a shape never warmed up falls back to the
eager path (logged), it never compiles. Prefill, batches above the largest bucket, IPEX kernels,
int8 matrices whose width inductor's int8 GEMM cannot take (INT8_K_ALIGN) where a bucket uses
it, and an int8 KV cache keep the eager path (`accepts`, `not_compilable`). int8 / int4
weights are frozen as their codes (shard_svc/frozen_step.py).

int8 products: by cpumesh's int8 kernel (an opaque op, shard_svc/quant_linear.py) in every bucket
whose kernel plan chose it (at start, by timing, as for eager steps; `--kernels cpumesh` forces
it; the plan's weights are then blocked for it, kernels.block_weights), else by inductor's C++
GEMM template. Interleaved steps, 2 threads, AMD EPYC (python -m bench.gemm_backends --variants
CPP,cpumesh): the 1B 38.7 -> 39.3 ms/step at 1 row, 251 -> 89 at 8; SmolLM2 7.8 -> 8.4 at 1 row
(its 576-wide products alone tie, 4.0 ms; the template fuses the element-wise work around them),
33.8 -> 17.5 at 8. The kernel also takes every input width; inductor's int8 GEMM does not
(INT8_K_ALIGN).

Which GEMMs a graph may take: shard_svc/compiled_gemms.py.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from shard_svc import decode_attention
from shard_svc.compiled_gemms import gemm_backends
from shard_svc.frozen_step import FrozenStep, layer_tensors, linear
from shard_svc.kernels import KernelPlan
from shard_svc.kv_cache import KVCache
from shard_svc.kv_store import FloatKV
from shard_svc.mesh.communicator import Communicator, LocalOnly
from shard_svc.model import Batch, ShardModel, apply_rope, rms_norm
from shard_svc.quant import Int8Weight, Matrix
from shard_svc.quant_linear import CPUMESH_METHODS, INT8_K_ALIGN

log = logging.getLogger("cpumesh.shard")
BATCH_BUCKETS = (1, 8)  # a step of 2-8 rows costs little more than one (weights read once)
CONTEXT_ALIGN = 64
# Inductor's weight-only int8 GEMM (torch 2.13) on K = 200 inputs: NaN at 1 row, a segmentation
# fault at 4; K = 96, 192, 208, 224, 576, 1536 were right (bfloat16, AMX Xeon). ATen's eager
# kernel has the same limit (quant_linear.INT8_K_ALIGN).
_active = threading.local()  # .comm: the communicator of the step running on this thread


@torch.library.custom_op("cpumesh::all_reduce", mutates_args=())
def mesh_all_reduce(x: Tensor) -> Tensor:
    """Sum x over the ranks of the step's communicator, into a copy (ops may not mutate
    inputs) made outside inference mode: inductor may reuse the op's output as a later kernel's
    buffer, which torch refuses for an inference tensor outside the mode."""
    comm: Communicator = _active.comm
    out = x.contiguous().clone()
    with torch.inference_mode():  # as in the eager step: the mesh's buffers are made in it
        comm.all_reduce(out)  # in place
    return out


@mesh_all_reduce.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


class CompiledDecode:
    def __init__(self, model: ShardModel, mode: str = "max-autotune",
                 buckets: tuple[int, ...] = BATCH_BUCKETS) -> None:
        """mode: torch.compile's; buckets: the batch sizes warmed up."""
        why = not_compilable(model, buckets)
        if why:
            raise ValueError(f"compiled decode: {why}")
        self.model, self.mode = model, mode
        self.gemms = gemm_backends(model)
        # the buckets whose int8 products take cpumesh's kernel: where the kernel plan chose it,
        # or its int4 kernel (an int4 model's int8 LM head: inductor would otherwise fold its
        # codes into a bfloat16 copy, 0.5 GB more for the 1B, read at twice the bytes)
        assert isinstance(model.kernels, KernelPlan)  # (not_compilable)
        self.int8_kernel_rows = frozenset(b for b in buckets
                                          if model.kernels.method(b) in CPUMESH_METHODS)
        self.attention = decode_attention.load(model.config.head_dim)  # its ISA; None: SDPA
        self.buckets = tuple(sorted(buckets))
        self.graphs = 0  # graphs compiled so far (the backend counts them)
        self.warm: set[int] = set()  # batch buckets compiled
        self.steps = 0  # steps run compiled
        self._src: dict[int, Tensor] = {}  # rows in the step: each bucket row's source row
        self._layer_caches: tuple[Tensor | None, list[Tensor], list[Tensor]] = (None, [], [])
        c, p = model.config, model.plan
        self.dims = (c.rms_norm_eps, p.num_q_heads, p.num_kv_heads, c.head_dim, model.scale,
                     p.tp_size > 1)
        # No guards on the step module's attributes (its weights, frozen into the graph, and
        # settings, never changed after this): each step checked them all, 0.3-0.6 ms of a
        # SmolLM2 step (interleaved: bfloat16 10.7 -> 10.1 ms, int8 6.8 -> 6.5). The inputs'
        # guards stay: they pick the bucket's graph and catch a shape never warmed up.
        self._compiled = torch.compile(
            FrozenStep(model, self._layer, c.rms_norm_eps, self.int8_kernel_rows),
            backend=self._backend, dynamic=False,
            options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 1024)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Any:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        patches = list_mode_options(self.mode)
        # round where eager rounds (half precision): fused kernels otherwise keep float32
        patches["emulate_precision_casts"] = True
        patches["freezing"] = True
        # no per-step checks of every op's output size, stride and alignment (about 240 calls
        # in SmolLM2's step; interleaved int8 steps 8.18 -> 8.00 ms): the graph's shapes are
        # static and its ops tested against eager
        patches["size_asserts"] = patches["alignment_asserts"] = False
        if self.gemms:
            try:
                return compile_fx(gm, example_inputs, config_patches=patches | {
                    "max_autotune_gemm_backends": self.gemms})
            except Exception as e:  # inductor wraps it; only this one is retried
                if "NoValidChoicesError" not in f"{type(e).__name__}: {e}":
                    raise
                log.warning("compiled decode: no %s GEMM for a product of this graph (%s); "
                            "max-autotune's choice instead", self.gemms, str(e).splitlines()[0])
                self.gemms = None
        return compile_fx(gm, example_inputs, config_patches=patches)

    # -- which steps ------------------------------------------------------------------------

    def accepts(self, batch: Batch, cache: KVCache) -> bool:
        """A decode step (one new token per sequence) of at most the largest bucket's rows,
        float weights and a float KV cache, every bucket warmed up."""
        b = len(batch.spans)
        return (len(batch.tokens) == b <= self.buckets[-1] and isinstance(cache.store, FloatKV)
                and self.bucket(b) in self.warm)

    # -- running ----------------------------------------------------------------------------

    def logits(self, batch: Batch, cache: KVCache) -> Tensor | None:
        """This rank's logits of the step [B, V], as `ShardModel.local_logits` gives them;
        None when the compiled graphs would have to compile (the caller then runs eager)."""
        assert batch.padded_slots is not None and batch.history is not None  # a decode step
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                out = self.run(batch.tokens, batch.positions, batch.write_slots,
                               batch.padded_slots, batch.history, cache, self.model.comm)
            self.steps += 1
            return out
        except RuntimeError as e:
            if "recompil" not in str(e).lower():
                raise
            log.warning("compiled decode: %d rows would recompile; eager step (%s)",
                        len(batch.spans), str(e).splitlines()[0])
            return None

    @torch.no_grad()
    def run(self, tokens: Tensor, positions: Tensor, write_slots: Tensor, slots: Tensor,
            lengths: Tensor, cache: KVCache, comm: Communicator) -> Tensor:
        """slots [n, Lmax]: each row's history by slot (padding: any of its slots, as
        `make_batch` gives it), lengths [n]."""
        n = len(tokens)
        rows = self.bucket(n)
        if n not in self._src:
            self._src[n] = torch.cat([torch.arange(n), torch.zeros(rows - n, dtype=torch.int64)])
        src = self._src[n]  # [Bb]: each row's source row (padding rows repeat row 0)
        width = -(-slots.shape[1] // CONTEXT_ALIGN) * CONTEXT_ALIGN
        pad = slots[:, :1].expand(n, width - slots.shape[1])  # more of each row's first slot
        index = torch.cat([slots, pad], dim=1)  # [n, L]
        if rows > n:
            tokens, positions, write_slots = tokens[src], positions[src], write_slots[src]
            index, lengths = index[src], lengths[src]  # [Bb, L], [Bb]
        torch._dynamo.mark_dynamic(index, 1)
        mask = None
        if not self.attention:  # SDPA's: -inf past each row's history, [Bb, 1, 1, L]
            mask = torch.zeros(rows, 1, 1, width, dtype=cache.dtype).masked_fill(
                torch.arange(width).view(1, 1, 1, -1) >= lengths.view(-1, 1, 1, 1),
                float("-inf"))
            torch._dynamo.mark_dynamic(mask, 3)
        self.model.kernels.for_step(rows)
        _active.comm = comm
        if self._layer_caches[0] is not cache.k:  # each layer's K and V, inputs of the graph
            self._layer_caches = (cache.k, list(cache.k.unbind()), list(cache.v.unbind()))
        tracing = (torch._inductor.config.patch(freezing=True)  # dynamo reads it while tracing
                   if rows not in self.warm else contextlib.nullcontext())
        with tracing:
            logits = self._compiled(tokens, positions, write_slots, src, index, lengths, mask,
                                    *self._layer_caches[1:])
        return logits[:n]

    def warm_up(self, cache: KVCache) -> float:
        """Compile every batch bucket (on a scratch sequence of the cache, with the sums
        skipped, so a rank warms up alone); return the seconds it took."""
        t0, seq_id = time.monotonic(), -2
        cache.add(seq_id)
        try:
            slot = cache.extend(seq_id, [0])
            for rows in self.buckets:
                t1 = time.monotonic()
                # distinct tensors, as a step's (dynamo guards that two inputs are one)
                self.run(torch.zeros(rows, dtype=torch.int64),
                         torch.zeros(rows, dtype=torch.int64), slot.repeat(rows),
                         slot.repeat(rows, 1),
                         torch.ones(rows, dtype=torch.int64), cache,
                         LocalOnly(self.model.plan.tp_rank, self.model.plan.tp_size))
                self.warm.add(rows)
                log.info("compiled decode: %d rows warm in %.1f s", rows, time.monotonic() - t1)
        finally:
            cache.release(seq_id)
        return time.monotonic() - t0

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if rows >= 1 and rows <= b)

    # -- the math (traced) ------------------------------------------------------------------

    def _layer(self, x: Tensor, cos: Tensor, sin: Tensor, write_slots: Tensor, src: Tensor,
               index: Tensor, lengths: Tensor, mask: Tensor | None, k_cache: Tensor,
               v_cache: Tensor, w: tuple[Matrix | None, ...]) -> Tensor:
        """One decoder layer for Bb rows of one token each; K and V of the layer's cache
        [Hkv, P*S, D] written at `write_slots`, row b's history read at index[b, :lengths[b]]
        (by the C++ kernel in place, else gathered for SDPA with `mask`)."""
        eps, hq, hkv, d, scale, reduce = self.dims
        input_norm, qkv_w, qkv_b, wo, post_norm, gate_up, w_down = w
        assert isinstance(input_norm, Tensor) and isinstance(post_norm, Tensor)
        assert qkv_w is not None and wo is not None and gate_up is not None and w_down is not None
        assert qkv_b is None or isinstance(qkv_b, Tensor)
        n, width = x.shape[0], index.shape[1]
        k8 = n in self.int8_kernel_rows

        def all_reduce(x: Tensor) -> Tensor:
            return mesh_all_reduce(x) if reduce else x

        h = rms_norm(x, input_norm, eps)
        qkv = linear(h, qkv_w, qkv_b, k8)  # [Bb, (Hq + 2 Hkv) * D]
        qk = apply_rope(qkv[:, :(hq + hkv) * d].view(n, hq + hkv, d), cos, sin)
        q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
        k_cache.index_copy_(1, write_slots, k[src].transpose(0, 1).to(k_cache.dtype))
        v_cache.index_copy_(1, write_slots, v[src].transpose(0, 1).to(v_cache.dtype))
        q = q.reshape(n, hkv, hq // hkv, d)
        if mask is None:
            o = decode_attention.decode_attention(q, k_cache, v_cache, index, lengths, scale)
        else:
            flat = index.reshape(-1)
            ks = k_cache.index_select(1, flat).view(hkv, n, width, d).transpose(0, 1)
            vs = v_cache.index_select(1, flat).view(hkv, n, width, d).transpose(0, 1)
            o = F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask, scale=scale)
        x = x + all_reduce(linear(o.reshape(n, -1), wo, int8_kernel=k8))
        h = rms_norm(x, post_norm, eps)
        gate, up = linear(h, gate_up, int8_kernel=k8).chunk(2, dim=-1)
        return x + all_reduce(linear(F.silu(gate) * up, w_down, int8_kernel=k8))


def not_compilable(model: ShardModel, buckets: tuple[int, ...] = BATCH_BUCKETS) -> str | None:
    """Why this model's decode cannot run compiled in these batch buckets (None: it can)."""
    if not isinstance(model.kernels, KernelPlan):
        return f"kernels {type(model.kernels).__name__} are not traced (only KernelPlan's)"
    if model.kernels.packed:
        return "oneDNN-packed weights cannot be frozen into the graph (plain kernels needed)"
    matrices = [m for layer in model.w.layers for m in layer_tensors(layer)]
    odd = sorted({m.shape[1] for m in [*matrices, model.w.lm_head]
                  if isinstance(m, Int8Weight) and m.shape[1] % INT8_K_ALIGN})
    if odd and any(model.kernels.method(b) not in CPUMESH_METHODS for b in buckets):
        return (f"int8 matrices {odd} inputs wide (not multiples of {INT8_K_ALIGN}: inductor's "
                "weight-only int8 GEMM computes NaN or crashes on them)")
    return None


def compile_decode(model: ShardModel, cache: KVCache,
                   buckets: tuple[int, ...] = BATCH_BUCKETS) -> CompiledDecode | None:
    """`--compile decode` at shard start: compile and warm every bucket, logged; None (eager,
    logged) when this model or cache cannot run compiled."""
    why = not_compilable(model, buckets) or (None if isinstance(cache.store, FloatKV)
                                    else "an int8 KV cache runs eager")
    if why:
        log.warning("--compile decode: %s; every step eager", why)
        return None
    compiled = CompiledDecode(model, buckets=buckets)
    log.info("compiling decode steps of %s rows (a graph each, about a minute each on 2 "
             "cores; less when inductor's cache holds them; GEMMs: %s; decode attention: %s)",
             " and ".join(filter(None, (", ".join(map(str, compiled.buckets[:-1])),
                                        str(compiled.buckets[-1])))),
             compiled.gemms or "max-autotune's choice",
             f"C++ kernel ({compiled.attention})" if compiled.attention else "gather + SDPA")
    seconds = compiled.warm_up(cache)
    log.info("compiled decode: buckets %s rows, %d graphs, warm in %.1f s", compiled.buckets,
             compiled.graphs, seconds)
    return compiled

