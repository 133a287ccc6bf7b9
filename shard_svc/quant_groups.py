"""int8 in groups of 32 inputs, asymmetric: what `--dtype int8` serves where cpumesh's kernels
build (shard_svc/csrc/group_linear.cpp), else int8 per row (shard_svc/quant.py).

    w[n, k] ≈ q[n, k] * s[n, g] + o[n, g]      q in 0..255, g = k // 32, o the group's minimum

A scale and an offset per 32 inputs, both float16 (1.125 bytes a weight against 1.0 per row):
measured on SmolLM2 (bench/quality.py, 1000 tokens, float32 activations), int8 per row agrees
with float32's top-1 at 94.5 %, groups of 32 at 99 %+; with bfloat16 activations 96.6 %, so
this scheme runs with float32 activations (the kernel rounds them to int16 per row either way).
GGUF Q8_0 (w = d * q8, q8 in -127..127) is exactly q = q8 + 128, s = d, o = -128 d: where every
offset is -128 times its scale, the layout keeps the scales alone (1.0625 bytes a weight, as
Q8_0's) and the kernel derives the offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32  # inputs per scale and offset
BLOCK = 16  # rows per block of the kernel's layout
SCALES = torch.float16  # the scales' and offsets' dtype
ACTIVATIONS = torch.float32  # the activations' dtype of a model served so (see above)
DERIVED = -128  # offset / scale of GGUF Q8_0's codes: kept as scales alone, offsets derived


@dataclass
class Int8GroupCodes:
    q: torch.Tensor  # uint8 [N, K], 0..255
    scales: torch.Tensor  # float32 [N, K / 32]
    offsets: torch.Tensor  # float32 [N, K / 32]

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        q = self.q.float().view(n, k // GROUP, GROUP)
        return (q * self.scales[..., None] + self.offsets[..., None]).view(n, k)


def fits(n: int, k: int) -> bool:
    """Whether a [n, k] matrix takes this layout (else: int8 per row)."""
    return n % BLOCK == 0 and k % GROUP == 0


def quantize_int8_groups(w: torch.Tensor) -> Int8GroupCodes:
    """Min-max int8 of a float matrix [N, K] in groups of 32, the scale and minimum rounded to
    float16 first (the codes are chosen against the values the kernel will use)."""
    n, k = w.shape
    g = w.float().view(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    lo16 = lo.to(SCALES).float()
    s16 = ((hi - lo16) / 255).clamp(min=1e-7).to(SCALES).float()  # fp16's normal range
    q = torch.round((g - lo16[..., None]) / s16[..., None]).clamp(0, 255).to(torch.uint8)
    return Int8GroupCodes(q.view(n, k), s16, lo16)


@dataclass
class Int8GroupWeight:
    """int8 in groups, in cpumesh's kernel's layout (`block_int8_groups`):
    q  uint8 [N / 16, K / 32, 16, 16, 2]: block, group, pair of inputs, row, input of the pair;
    so float16 [N / 16, K / 32, P, 16]: each group's 16 scales, then (P = 2) its 16 offsets;
       P = 1: every offset is -128 times its scale (GGUF Q8_0's codes).
    `dtype` is the activations' (the kernel's x and output)."""

    q: torch.Tensor
    so: torch.Tensor
    dtype: torch.dtype

    blocked = True

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0] * BLOCK, self.q.shape[1] * GROUP)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.so.nbytes

    def rows_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The given rows dequantized [len, K] in `dtype` (the embedding lookup)."""
        blocks, lanes = rows // BLOCK, rows % BLOCK
        q = self.q[blocks, :, :, lanes].flatten(-3)  # [R, K / 32, 16, 2] → [R, K]
        s, o = scale_offset(self.so[blocks, :, :, lanes].float())  # [R, K / 32, 1] each
        w = q.float().view(len(rows), -1, GROUP) * s + o
        return w.flatten(-2).to(self.dtype)

    def dequantize_rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows start:stop (multiples of 16) dequantized into `out`."""
        n, k = stop - start, self.shape[1]
        q = self.q[start // BLOCK:stop // BLOCK]  # [n/16, K/32, 16, 16, 2]
        w = out[:n].view(n // BLOCK, BLOCK, k // GROUP, GROUP)
        w.copy_(q.permute(0, 3, 1, 2, 4).reshape(n // BLOCK, BLOCK, k // GROUP, GROUP))
        s, o = scale_offset(self.so[start // BLOCK:stop // BLOCK].permute(0, 3, 1, 2))
        w.mul_(s).add_(o)  # (s, o [n/16, 16, K/32, 1])
        return out[:n]

    def slice_rows(self, start: int, stop: int) -> Int8GroupWeight:
        """Rows start:stop (multiples of 16) as a view (a tied LM head's vocabulary slice)."""
        return Int8GroupWeight(self.q[start // BLOCK:stop // BLOCK],
                               self.so[start // BLOCK:stop // BLOCK], self.dtype)


def scale_offset(so: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales and offsets of `so` [..., P] (P = 1: the offsets derived, -128 x scale)."""
    s = so[..., :1]
    return s, so[..., 1:] if so.shape[-1] == 2 else s * DERIVED


def block_int8_groups(codes: Int8GroupCodes, dtype: torch.dtype) -> Int8GroupWeight:
    """`codes` in the kernel's layout (the scales alone where every offset is -128 x its
    scale, in float16 as stored); `dtype` the activations'."""
    n, k = codes.q.shape
    q = codes.q.view(n // BLOCK, BLOCK, k // GROUP, GROUP // 2, 2).permute(0, 2, 3, 1, 4)
    s16, o16 = codes.scales.to(SCALES), codes.offsets.to(SCALES)
    parts = (s16,) if torch.equal(o16, s16 * DERIVED) else (s16, o16)
    so = torch.stack(parts, dim=1)  # [N, P, K / 32]
    so = so.view(n // BLOCK, BLOCK, len(parts), k // GROUP).permute(0, 3, 2, 1)
    return Int8GroupWeight(q.contiguous(), so.contiguous(), dtype)
