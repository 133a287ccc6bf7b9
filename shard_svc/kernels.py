"""Which kernels run the matrix products: chosen once at start, behind this one seam.

The model is plain torch and calls `KernelPlan.linear` for every matrix product; what differs
between CPUs is which library serves it best:

  aten    ATen's own kernels (oneDNN switched off): reads half-precision weights at the memory
          roofline at one token on an AVX-512 Zen4, but collapses at 8 tokens (4-5 GB/s);
  onednn  torch's default for half precision: the weight is reordered on every call;
  packed  oneDNN with the weights reordered once, at load, into its blocked layout
          (`mkldnn._reorder_linear_weight`, what inductor's freezing does): on CPUs with
          AVX-512 BF16 / AMX it reads the weights once per step whatever the batch, so 8 tokens
          cost what one does. Refused by oneDNN on CPUs without AVX-512 (or avx_ne_convert).
  ipex    Intel Extension for PyTorch's LLM kernels around the plain ones, as auto picks them
          (shard_svc/ipex_backend.py); auto takes it by itself where IPEX is usable. Refused
          where IPEX is not installed or not built for this torch.

At start, on this shard's own weights (layers' gate/up matrices, 32 MB of them or all, so the
weights stream from memory as in a real step), each library is timed for a step of one token, of
eight and of a 128-token prefill; the fastest plain library per bucket, or packed weights for
all buckets when they win clearly (by 15 %) at both one and eight tokens (half precision only), is
kept, and the choice is logged in one line.
`ShardConfig.kernels` (--kernels) forces one; tests compare each against transformers.

int8 / int4 weights (shard_svc.quant) have their own methods, timed the same way per bucket
(shard_svc.quant_linear): cpumesh's int8 / int4 kernels where they build, ATen's weight-only
kernels, or dequantize-per-call; float matrices beside them (the LM head) go through oneDNN.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from services.errors import InvalidArgument
from shard_svc.heap import release_freed_memory
from shard_svc.ipex_detect import require_ipex
from shard_svc.quant import (
    INT4,
    INT8_BLOCK,
    Int4Weight,
    Int8Weight,
    Matrix,
    QuantWeight,
    block_int8,
)
from shard_svc.quant_groups import Int8GroupWeight
from shard_svc.quant_linear import (
    DEQUANTIZE,
    INT4_KERNEL,
    INT8_KERNEL,
    METHODS,
    WEIGHT_ONLY,
    int4_kernel,
    int8_kernel,
    quant_linear,
    release_scratch,
)
from shard_svc.weights import ShardWeights

LIBRARIES = ("auto", "aten", "onednn", "packed", "cpumesh", "ipex")
BUCKETS = (1, 16, 2**31)  # tokens in the step: one sequence's decode, a decode batch, a prefill
PROBE_TOKENS = (1, 8, 128)
# Packed weights are kept only when at least 15 % faster at 1 and 8 tokens, and never tried for
# float32 in auto: there they tie the plain kernels at one token (AVX-512 and AMX measured), a
# loaded machine's noise could still pick them, and repacking a model in place left its process
# holding ~20 % more memory (freed plain matrices the allocator keeps). --kernels packed forces it.
PACKED_MARGIN = 0.85
T = TypeVar("T", bound=torch.Tensor | Int8Weight | Int4Weight | Int8GroupWeight)
PROBE_BYTES = 32 * 2**20  # the probe times products over this much of the weights (or all)
QUANT_DTYPES = (torch.int8, INT4)
# --kernels for int8 / int4: aten = ATen's weight-only kernels (for int4 weights in cpumesh's
# layout, made wherever its kernels build, its int4 kernel), onednn = dequantize per call,
# cpumesh = cpumesh's int8 / int4 kernel
QUANT_METHODS = {"aten": WEIGHT_ONLY, "onednn": DEQUANTIZE, "cpumesh": INT8_KERNEL}


@dataclass(frozen=True)
class KernelPlan:
    dtype: torch.dtype
    libraries: tuple[str, ...]  # per bucket: "aten", "onednn" or "packed" (then all are);
    # with int8 / int4 weights: one of quant_linear.METHODS
    timings_us: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    bucket: list[int] = dataclasses.field(default_factory=lambda: [0])  # the step's, for_step's

    @property
    def quantized(self) -> bool:
        return self.libraries[0] in METHODS

    def method(self, tokens: int) -> str:
        """The library (or int8 / int4 method) of a step of `tokens` tokens."""
        return self.libraries[bucket_of(tokens)]

    @property
    def packed(self) -> bool:
        return self.libraries[0] == "packed"

    def describe(self) -> str:
        names = ("1 token", "<= 16 tokens", "more")
        parts = [f"{n}: {lib}" for n, lib in zip(names, self.libraries, strict=True)]
        timed = "; ".join(f"{lib} " + "/".join(f"{t:.0f}" for t in times)
                          for lib, times in self.timings_us.items())
        return (f"kernels for {str(self.dtype).removeprefix('torch.')} on "
                f"{torch.backends.cpu.get_cpu_capability()}: " + ", ".join(parts)
                + (f" (us for 1/8/128 tokens: {timed})" if timed else ""))

    def for_step(self, tokens: int) -> None:
        """Set oneDNN on or off for a step of `tokens` tokens (plain weights only)."""
        bucket = self.bucket[0] = bucket_of(tokens)
        if torch.backends.mkldnn.is_available():
            torch._C._set_mkldnn_enabled(self.libraries[bucket] != "aten")

    def embedding(self, tokens: torch.Tensor, table: Matrix) -> torch.Tensor:
        return embedding_rows(tokens, table)

    def linear(self, x: torch.Tensor, w: Matrix,
               b: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w.T + b, with w as `prepare` left it."""
        if isinstance(w, QuantWeight):
            return quant_linear(x, w, b, self.libraries[self.bucket[0]])
        if w.is_mkldnn:  # packed by `prepare`
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, w, b)

    def prepare(self, w: ShardWeights) -> ShardWeights:
        """The weights in the layout the kernels read. Packing reorders them once, here, in
        place (one matrix at a time, so memory grows by one matrix, not by the model): the
        plain matrices of `w` are gone afterwards. A tied LM head (a view of the embedding,
        which the lookup needs plain) stays plain: packing it would copy it."""
        if self.quantized and INT8_KERNEL in self.libraries and WEIGHT_ONLY not in self.libraries:
            return block_weights(w)
        if not self.packed or w.packed or self.quantized:
            return w
        for layer in w.layers:
            for name in ("qkv", "wo", "gate_up", "w_down"):
                setattr(layer, name, pack(getattr(layer, name)))
        assert isinstance(w.lm_head, torch.Tensor) and isinstance(w.embed, torch.Tensor)
        if w.lm_head.untyped_storage().data_ptr() != w.embed.untyped_storage().data_ptr():
            w.lm_head = pack(w.lm_head)
        w.packed = True
        return w


def block_weights(w: ShardWeights) -> ShardWeights:
    """int8 matrices in cpumesh's blocked layout (one at a time, in place), for a plan whose
    every int8 product is cpumesh's kernel or dequantize; a tied LM head (a slice of the
    embedding's rows) stays a slice of the blocked table, which the lookup reads as it is.
    Weights already blocked stay as they are (the shard's warm-up twin prepares them again:
    once, that re-sliced rank 1's tied LM head from the blocked table, and tp-2 int8 served
    garbage)."""
    for layer in w.layers:
        for name in ("qkv", "wo", "gate_up", "w_down"):
            m = getattr(layer, name)
            if isinstance(m, Int8Weight):
                setattr(layer, name, block_int8(m))
    head, embed = w.lm_head, w.embed
    if isinstance(head, Int8Weight) and not head.blocked:
        if (isinstance(embed, Int8Weight)
                and head.q.untyped_storage().data_ptr() == embed.q.untyped_storage().data_ptr()):
            start = (head.q.data_ptr() - embed.q.data_ptr()) // embed.q.stride(0)  # tied: a slice
            rows, blocked = head.shape[0], block_int8(embed)
            if blocked.blocked and start % INT8_BLOCK == 0 and rows % INT8_BLOCK == 0:
                w.embed = blocked
                w.lm_head = Int8Weight(
                    blocked.q[start // INT8_BLOCK:(start + rows) // INT8_BLOCK], head.scales)
        else:
            w.lm_head = block_int8(head)
    release_freed_memory()  # the matrices' row layouts (glibc would keep them)
    return w


def bucket_of(tokens: int) -> int:
    return next(i for i, limit in enumerate(BUCKETS) if tokens <= limit)


def pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)


def packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of `dtype` on this CPU (bf16/f16 need AVX-512 or
    avx_ne_convert)."""
    try:
        pack(torch.zeros(8, 8, dtype=dtype))
    except RuntimeError:
        return False
    return True


def check_library(library: str, dtype: torch.dtype) -> None:
    """Refuse a library this CPU cannot run for `dtype` (before any work is done)."""
    if library not in LIBRARIES:
        raise InvalidArgument(f"kernel library must be one of {LIBRARIES}, got {library!r}")
    if library == "ipex":
        require_ipex()
        return
    if library == "cpumesh":
        if dtype not in QUANT_DTYPES:
            raise InvalidArgument(f"kernels 'cpumesh' is cpumesh's int8 / int4 kernel, for "
                                  f"--dtype int8 or int4; with {dtype} use auto, aten or onednn")
        if not int4_kernel():
            raise InvalidArgument("kernels 'cpumesh': cpumesh's C++ kernels do not build on "
                                  "this machine (see the log); use auto, aten or onednn")
        return
    if dtype in QUANT_DTYPES:
        if library == "packed":
            raise InvalidArgument(f"kernels 'packed' is for float weights; with {dtype} use "
                                  "auto, aten (weight-only kernels) or onednn (dequantize)")
        return
    if library == "packed" and not packs(dtype):
        raise InvalidArgument(f"kernels 'packed': oneDNN cannot pack {dtype} weights on this "
                              f"CPU ({torch.backends.cpu.get_cpu_capability()}); use auto, aten "
                              "or onednn")


def embedding_rows(tokens: torch.Tensor, table: Matrix) -> torch.Tensor:
    """The rows of `tokens` (int8 tables expanded row by row, in the scales' dtype); also traced
    by the compiled step (shard_svc/frozen_step.py)."""
    if isinstance(table, Int8Weight) and table.blocked:  # row t: block t // 16, lane t % 16
        rows = table.q[tokens // INT8_BLOCK, :, tokens % INT8_BLOCK].flatten(-2)
        return rows.to(table.dtype) * table.scales[tokens, None]
    if isinstance(table, Int8Weight):
        return table.q[tokens].to(table.dtype) * table.scales[tokens, None]
    if isinstance(table, Int8GroupWeight):
        return table.rows_of(tokens)
    if isinstance(table, Int4Weight):
        raise TypeError("int4 embedding tables are not supported")
    return F.embedding(tokens, table)


def choose_kernels(library: str, dtype: torch.dtype, weights: Sequence[Matrix],
                   packing: bool = True) -> KernelPlan:
    """The plan for `library`; "auto" times the libraries on `weights` ([out, in] matrices
    of the model, in `dtype`, together larger than the CPU's caches), packed weights among
    them unless `packing` is False (a compiled decode step freezes the plain weights)."""
    if library == "ipex":  # IPEX wraps the plain plan (ipex_backend.with_ipex): time that
        library = "auto"
    if any(isinstance(w, QuantWeight) for w in weights):
        return choose_quant(library, weights)
    check_library(library, dtype)
    if library != "auto":
        return KernelPlan(dtype, (library,) * len(BUCKETS))
    probe = _prefix([w for w in weights if isinstance(w, torch.Tensor)], PROBE_BYTES)
    candidates: dict[str, Sequence[torch.Tensor]] = {"aten": probe, "onednn": probe}
    if packing and dtype != torch.float32 and packs(dtype):  # see PACKED_MARGIN
        candidates["packed"] = [pack(w) for w in probe]
    timings = {lib: tuple(_time(lib, ws, n) for n in PROBE_TOKENS)
               for lib, ws in candidates.items()}
    plain = tuple(min(("aten", "onednn"), key=lambda lib: timings[lib][i])
                  for i in range(len(BUCKETS)))
    packed = timings.get("packed")
    # Packing must win clearly: its blocked layout can take more memory, and noise must not
    # decide (float32 packed ties the plain kernels at one token on AVX-512).
    if packed and all(packed[i] < PACKED_MARGIN * timings[plain[i]][i] for i in (0, 1)):
        return KernelPlan(dtype, ("packed",) * len(BUCKETS), timings)
    return KernelPlan(dtype, plain, timings)


def choose_quant(library: str, weights: Sequence[Matrix]) -> KernelPlan:
    """The plan for int8 / int4 weights: the fastest method per bucket (quant_linear's). Where
    cpumesh's int8 kernel runs, ATen's weight-only int8 kernel is not a candidate: it was slower
    at every probe size in every run (1B, 1 / 8 / 128 tokens: 1.8 / 5.0-6.5 / 62-77 ms against
    0.9 / 3.3-3.7 / 53-57), yet the probe's noise once picked it for 8 tokens, which kept every
    matrix in rows (1B int8 46 ms/token against 40 blocked). The kernel is timed on blocked
    copies of the probe, the layout it will read."""
    quant = [w for w in weights if isinstance(w, QuantWeight)]
    dtype = INT4 if isinstance(quant[0], Int4Weight) else torch.int8
    check_library(library, dtype)
    # layouts only cpumesh's kernels read: int4 blocked, int8 in groups (quant_groups)
    own = (INT8_KERNEL if isinstance(quant[0], Int8GroupWeight) else
           INT4_KERNEL if isinstance(quant[0], Int4Weight) and quant[0].blocked else None)
    if library != "auto":
        method = QUANT_METHODS[library]
        return KernelPlan(dtype, ((own if own and method != DEQUANTIZE
                                   else method),) * len(BUCKETS))
    probe = _prefix(quant, PROBE_BYTES)
    methods: tuple[str, ...] = (WEIGHT_ONLY, DEQUANTIZE)
    timings: dict[str, tuple[float, ...]] = {}
    if own:
        timings[own] = tuple(_time_quant(own, probe, n) for n in PROBE_TOKENS)
        methods = (DEQUANTIZE,)
    elif dtype == torch.int8 and int8_kernel():  # ATen's weight-only int8 is dominated (above)
        blocked = [block_int8(w) for w in probe if isinstance(w, Int8Weight)]
        timings[INT8_KERNEL] = tuple(_time_quant(INT8_KERNEL, blocked, n) for n in PROBE_TOKENS)
        methods = (DEQUANTIZE,)
    timings |= {m: tuple(_time_quant(m, probe, n) for n in PROBE_TOKENS) for m in methods}
    best = tuple(min(timings, key=lambda m: timings[m][i]) for i in range(len(BUCKETS)))
    if DEQUANTIZE not in best:
        release_scratch()
    return KernelPlan(dtype, best, timings)


def _time_quant(method: str, weights: Sequence[QuantWeight], tokens: int,
                rounds: int = 5) -> float:
    x = torch.randn(tokens, weights[0].shape[1]).to(weights[0].dtype)
    quant_linear(x, weights[0], None, method)  # first-call costs (the scratch) untimed
    return statistics.median(_once(lambda: [quant_linear(x, w, None, method) for w in weights])
                             for _ in range(rounds))


def _prefix(weights: Sequence[T], limit: int) -> list[T]:
    """The first weights that together hold at least `limit` bytes (all, if fewer)."""
    out: list[T] = []
    for w in weights:
        if sum(x.nbytes for x in out) >= limit:
            break
        out.append(w)
    return out


def _time(library: str, weights: Sequence[torch.Tensor], tokens: int, rounds: int = 5) -> float:
    """Median µs of one pass of `tokens`-row products over all `weights` with `library`."""
    x = torch.randn(tokens, weights[0].shape[1]).to(weights[0].dtype)
    plan = KernelPlan(weights[0].dtype, (library,) * len(BUCKETS))
    before = torch._C._get_mkldnn_enabled()
    try:
        plan.for_step(tokens)
        return statistics.median(_once(lambda: [plan.linear(x, w) for w in weights])
                                 for _ in range(rounds))
    finally:
        torch._C._set_mkldnn_enabled(before)


def _once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6
