"""The ways to multiply by an int8 / int4 weight; `choose_quant` (kernels.py) times them and
picks one per bucket.

  int8 kernel  cpumesh's C++ product for int8 weights (shard_svc/csrc/int8_linear.cpp, built by
               shard_svc/native.py): each row of x rounded to int16, integer dot products
               (AVX-512 VNNI / AVX2), weights as rows or, once the plan has chosen it, blocked
               16 rows at a time (quant.block_int8), every input width. At one token it reads
               the weights at memory speed: the 1B's 16 layer products (243 MB of codes), 2
               threads, AMD EPYC, as rows: 9.6 ms against 14.7 through ATen's weight-only
               kernel and 19.7 for the same matrices in bfloat16; at 8 tokens blocked, a
               compiled 1B step 89 ms against 251 through inductor's int8 GEMM.
               The same name serves int8 in groups of 32 (quant_groups.Int8GroupWeight) by
               the group kernel (shard_svc/csrc/group_linear.cpp: the int4 kernel's, with
               bytes for nibbles).
  int4 kernel  cpumesh's C++ product for int4 weights in its blocked layout
               (shard_svc/csrc/group_linear.cpp; quant.block_int4, made at load wherever the
               kernels build): each row of x rounded to int16, as the int8 kernel does, the
               codes widened to 16 bits, integer dot products in 32-bit lanes. ATen's
               weight-only int4 kernel cannot read that layout: for such weights
               "weight-only" is this kernel too. 1B-shaped products at one token, 2 threads:
               5.8-6.2 ms against 6.9-7.1 through ATen's; at 8 tokens 16.6 against 24.
  weight-only  ATen's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`: read the packed
               weight once per call. Fast at one token with bfloat16 activations (int8 ~30 GB/s
               on this AVX-512 BF16/AMX Xeon, 2 threads, H 2048 x 8192), but they scale with the
               tokens: at 128 tokens int8 took 62 ms where bf16 weights took 4 ms.
  dequantize   the weight is expanded a chunk of rows at a time (CHUNK_BYTES, into one scratch
               buffer per thread that is reused, never a float copy of the model) and multiplied
               by oneDNN's bf16 GEMM; int8 codes are exact in bf16 and the row scales are applied
               to the product. Costs an expansion per call (int8 ~0.4 ms per 2M weights, int4
               ~4 ms), so it wins for prefills and loses at one token.

`choose_quant` times them on the shard's own weights at 1, 8 and 128 tokens and keeps the fastest
per bucket (`--kernels aten` forces weight-only, `onednn` forces dequantize).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from shard_svc import native
from shard_svc.quant import INT8_BLOCK, Int4Weight, Int8Weight, QuantWeight
from shard_svc.quant_groups import BLOCK as GROUP_BLOCK
from shard_svc.quant_groups import Int8GroupWeight

INT8_KERNEL, INT4_KERNEL = "int8 kernel", "int4 kernel"
WEIGHT_ONLY, DEQUANTIZE = "weight-only", "dequantize"
METHODS = (INT8_KERNEL, INT4_KERNEL, WEIGHT_ONLY, DEQUANTIZE)
CPUMESH_METHODS = (INT8_KERNEL, INT4_KERNEL)  # a plan's buckets on cpumesh's own kernels
# ATen's `_weight_int8pack_mm` (torch 2.13, AVX-512 EPYC) on inputs not a multiple of 16 wide:
# garbage at 1 row (K = 100), NaN (K = 104), a segmentation fault at 4 rows (K = 100, 200). Such
# an int8 matrix (a row-parallel slice at tp 2 of an intermediate of 200) is dequantized instead.
INT8_K_ALIGN = 16
CHUNK_BYTES = 8 * 2**20  # scratch per thread for the dequantized rows
_scratch = threading.local()
_native: list[bool] = []  # native_kernels()'s answer, once known


def weight_only(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [N, K] (the weight's scale dtype) @ w.T → [N, rows]"""
    if isinstance(w, Int8GroupWeight):  # only cpumesh's group kernel reads it as it is
        return int8_group_linear(x, w)
    if isinstance(w, Int8Weight):
        if w.blocked:  # cpumesh's layout (block_int8): only its kernel reads it as it is
            return int8_linear(x, w)
        if w.shape[1] % INT8_K_ALIGN:
            return dequantized(x, w)
        return torch.ops.aten._weight_int8pack_mm(x, w.q, w.scales)
    if w.blocked:
        return int4_linear(x, w)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.group, w.scale_zeros)


def dequantized(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """The same product through chunks of rows expanded into a reused scratch buffer."""
    if isinstance(w, Int4Weight) and w.block_n is None:  # layout unknown here: cannot expand
        return weight_only(x, w)
    rows, k = w.shape
    block = (w.block_n if isinstance(w, Int4Weight) and w.block_n else
             INT8_BLOCK if isinstance(w, Int8Weight) and w.blocked else
             GROUP_BLOCK if isinstance(w, Int8GroupWeight) else 1)
    chunk = max(block, CHUNK_BYTES // (x.dtype.itemsize * k) // block * block)
    scratch = _buffer(x.dtype, chunk * k).view(chunk, k)
    out = torch.cat([F.linear(x, w.dequantize_rows(r, min(rows, r + chunk), scratch))
                     for r in range(0, rows, chunk)], dim=-1)
    return out * w.scales if isinstance(w, Int8Weight) else out


def _buffer(dtype: torch.dtype, elements: int) -> torch.Tensor:
    buffers: dict[tuple[torch.dtype, int], torch.Tensor] = _scratch.__dict__.setdefault("b", {})
    if (dtype, elements) not in buffers:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of the mode
            buffers[(dtype, elements)] = torch.empty(elements, dtype=dtype)
    return buffers[(dtype, elements)]


def release_scratch() -> None:
    """Hand back this thread's dequantize scratch (a plan that timed dequantize but chose a
    kernel: 8 MiB a dtype that no step reads again). The next dequantized product remakes it."""
    _scratch.__dict__.pop("b", None)


def native_kernels() -> bool:
    """Whether cpumesh's int8 and int4 kernels run here (built and loaded once, their shapes
    registered for compiled graphs; logged where they cannot)."""
    if not _native:
        _native.append(native.load() is not None)
        if _native[0]:
            @torch.library.register_fake("cpumesh_kernels::int8_linear")
            def _(x: Tensor, q: Tensor, s: Tensor) -> Tensor:
                return x.new_empty((*x.shape[:-1], q.shape[0]))

            @torch.library.register_fake("cpumesh_kernels::int8_linear_blocked")
            def _blocked(x: Tensor, q: Tensor, s: Tensor) -> Tensor:
                return x.new_empty((*x.shape[:-1], q.shape[0] * q.shape[2]))

            @torch.library.register_fake("cpumesh_kernels::int4_linear_blocked")
            def _int4(x: Tensor, q: Tensor, s: Tensor) -> Tensor:
                return x.new_empty((*x.shape[:-1], q.shape[0] * q.shape[4]))

            @torch.library.register_fake("cpumesh_kernels::int8_linear_grouped")
            def _grouped(x: Tensor, q: Tensor, s: Tensor) -> Tensor:
                return x.new_empty((*x.shape[:-1], q.shape[0] * q.shape[3]))
    return _native[0]


int8_kernel = int4_kernel = int8_group_kernel = native_kernels  # one extension holds them


def int8_linear(x: Tensor, w: Int8Weight) -> Tensor:
    """x [..., K] (the scales' dtype) @ (q * s[:, None]).T by cpumesh's kernel."""
    if w.blocked:
        return torch.ops.cpumesh_kernels.int8_linear_blocked(x, w.q, w.scales)
    return torch.ops.cpumesh_kernels.int8_linear(x, w.q, w.scales)


def int8_group_linear(x: Tensor, w: Int8GroupWeight) -> Tensor:
    """x [..., K] (float32, bfloat16 or float16) @ w.T by cpumesh's group kernel."""
    return torch.ops.cpumesh_kernels.int8_linear_grouped(x, w.q, w.so)


def int4_linear(x: Tensor, w: Int4Weight) -> Tensor:
    """x [..., K] (the scales' dtype) @ w.T by cpumesh's int4 kernel (w blocked)."""
    return torch.ops.cpumesh_kernels.int4_linear_blocked(x, w.packed, w.scale_zeros)


def quant_linear(x: torch.Tensor, w: QuantWeight, b: torch.Tensor | None,
                 method: str) -> torch.Tensor:
    if method in CPUMESH_METHODS and isinstance(w, Int8Weight) and int8_kernel():
        y = int8_linear(x, w)  # (with the int4 kernel: an int4 model's int8 embedding / head)
    elif method == DEQUANTIZE:
        y = dequantized(x, w)
    else:  # (blocked int4 / int8 in groups: cpumesh's kernels, the only ones that read them)
        y = weight_only(x, w)
    return y if b is None else y + b
