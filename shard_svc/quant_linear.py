"""The two ways to multiply by an int8 / int4 weight, and the timing that picks one per bucket.

  weight-only  ATen's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`: read the packed
               weight once per call. Fast at one token with bfloat16 activations (int8 ~30 GB/s
               on this AVX-512 BF16/AMX Xeon, 2 threads, H 2048 x 8192), but they scale with the
               tokens: at 128 tokens int8 took 62 ms where bf16 weights took 4 ms.
  dequantize   the weight is expanded a chunk of rows at a time (CHUNK_BYTES, into one scratch
               buffer per thread that is reused, never a float copy of the model) and multiplied
               by oneDNN's bf16 GEMM; int8 codes are exact in bf16 and the row scales are applied
               to the product. Costs an expansion per call (int8 ~0.4 ms per 2M weights, int4
               ~4 ms), so it wins for prefills and loses at one token.

`choose_quant` times both on the shard's own weights at 1, 8 and 128 tokens and keeps the faster
per bucket (`--kernels aten` forces weight-only, `onednn` forces dequantize).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from shard_svc.quant import Int4Weight, Int8Weight, QuantWeight

WEIGHT_ONLY, DEQUANTIZE = "weight-only", "dequantize"
# ATen's `_weight_int8pack_mm` (torch 2.13, AVX-512 EPYC) on inputs not a multiple of 16 wide:
# garbage at 1 row (K = 100), NaN (K = 104), a segmentation fault at 4 rows (K = 100, 200). Such
# an int8 matrix (a row-parallel slice at tp 2 of an intermediate of 200) is dequantized instead.
INT8_K_ALIGN = 16
CHUNK_BYTES = 8 * 2**20  # scratch per thread for the dequantized rows
_scratch = threading.local()


def weight_only(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [N, K] (the weight's scale dtype) @ w.T → [N, rows]"""
    if isinstance(w, Int8Weight):
        if w.shape[1] % INT8_K_ALIGN:
            return dequantized(x, w)
        return torch.ops.aten._weight_int8pack_mm(x, w.q, w.scales)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.group, w.scale_zeros)


def dequantized(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """The same product through chunks of rows expanded into a reused scratch buffer."""
    if isinstance(w, Int4Weight) and w.block_n is None:  # layout unknown here: cannot expand
        return weight_only(x, w)
    rows, k = w.shape
    block = w.block_n if isinstance(w, Int4Weight) and w.block_n else 1
    chunk = max(block, CHUNK_BYTES // (2 * k) // block * block)
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


def quant_linear(x: torch.Tensor, w: QuantWeight, b: torch.Tensor | None,
                 method: str) -> torch.Tensor:
    y = weight_only(x, w) if method == WEIGHT_ONLY else dequantized(x, w)
    return y if b is None else y + b
