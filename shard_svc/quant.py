"""Weight-only int8 and int4 matrices: made per rank slice at load, multiplied by the kernels.

A matrix is first held as *codes* (one byte per weight, easy to slice and stack row-wise, as the
fused QKV and gate/up matrices need), then *finished* into the layout the kernels read:

  int8  symmetric, one scale per output row:   w[n, k] ≈ q[n, k] * s[n]          (q in -127..127)
        served by cpumesh's int8 kernel or `aten._weight_int8pack_mm(x, q [N, K], s [N])`
  int8 in groups of 32, asymmetric, float16 scales and offsets (shard_svc/quant_groups.py):
        `--dtype int8` where cpumesh's kernels build; served by its group kernel
  int4  asymmetric, groups of `group` inputs:  w[n, k] ≈ (q[n, k] - 8) * s[n, g] + z[n, g]
        (q in 0..15, g = k // group): the layout of `aten._weight_int4pack_mm_for_cpu`, whose
        packed weight is `_convert_weight_to_int4pack_for_cpu(q)` and scales-and-zeros
        [K / group, N, 2]. GGUF Q4_0 (z = 0), Q4_1 (z = m + 8 d) and Q4_K (s = d·sc,
        z = 8 s - dmin·m) map onto it exactly at group 32.

Scales (and zeros) are stored in the activations' dtype, as the kernels require.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard_svc.quant_groups import (
    Int8GroupCodes,
    Int8GroupWeight,
    block_int8_groups,
    quantize_int8_groups,
)

# int4 made from float weights: groups of 32, as GGUF's Q4_0 / Q4_1. Measured on SmolLM2-135M
# (bench/quality.py, 100-200 tokens): g32 96 % top-1 with float32, perplexity x1.011; g64 58.5 %,
# x2.4; g128 60 %, x1.6 (its weights are a Q4_1 g32 grid: coarser groups round them again).
INT4_GROUP = 32
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes the int4 kernel takes
INT8_BLOCK = 16  # rows per block of cpumesh's blocked int8 layout (block_int8)
INT4_BLOCK = 16  # rows per block of cpumesh's blocked int4 layout (block_int4)


@dataclass
class Int8Codes:
    q: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float32 [N]

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales[:, None]


@dataclass
class Int4Codes:
    q: torch.Tensor  # uint8 [N, K], values 0..15
    scales: torch.Tensor  # float32 [N, K / group]
    zeros: torch.Tensor  # float32 [N, K / group]

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        q = self.q.float().view(n, -1, self.group) - 8
        return (q * self.scales[..., None] + self.zeros[..., None]).view(n, k)


Codes = Int8Codes | Int4Codes | Int8GroupCodes


def quantize_int8(w: torch.Tensor) -> Int8Codes:
    """Symmetric per-row int8 of a float matrix [N, K]."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Codes(q, scales)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> Int4Codes:
    """Asymmetric (min/max) int4 of a float matrix [N, K] in groups of `group` inputs."""
    n, k = w.shape
    if group not in INT4_GROUPS or k % group:
        raise ValueError(f"int4 group must be one of {INT4_GROUPS} and divide {k}, got {group}")
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return Int4Codes(q.view(n, k), scales, lo + 8 * scales)


def quantize(w: torch.Tensor, kind: str, group: int = INT4_GROUP) -> Codes:
    """kind: "int8" (per row), "int8g" (in groups of 32) or "int4" (in groups of `group`)."""
    if kind == "int8g":
        return quantize_int8_groups(w)
    return quantize_int8(w) if kind == "int8" else quantize_int4(w, group)


def kind_name(kind: str, group: int) -> str:
    """How a quantization kind reads in the load report: int8, int8 g32, int4 g32."""
    return "int8 g32" if kind == "int8g" else f"int4 g{group}" if kind == "int4" else kind


def cat_codes(parts: list[Codes]) -> Codes:
    """Row slices stacked (all of one kind; int4 of one group)."""
    if all(isinstance(p, Int8Codes) for p in parts):
        return Int8Codes(torch.cat([p.q for p in parts]),  # type: ignore[union-attr]
                         torch.cat([p.scales for p in parts]))
    if all(isinstance(p, Int8GroupCodes) for p in parts):
        return Int8GroupCodes(*(torch.cat([getattr(p, f) for p in parts])
                                for f in ("q", "scales", "offsets")))
    if (not all(isinstance(p, Int4Codes) for p in parts)
            or len({p.group for p in parts if isinstance(p, Int4Codes)}) != 1):
        raise ValueError("int4 parts of different kinds or groups cannot be stacked")
    return Int4Codes(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scales", "zeros")))


@dataclass
class Int8Weight:
    """What `KernelPlan.linear` multiplies by: x @ (q * s[:, None]).T, q as rows [N, K] or
    blocked for cpumesh's int8 kernel, [N / 16, K / 2, 16, 2] (`block_int8`)."""

    q: torch.Tensor  # int8 [N, K] or [N / 16, K / 2, 16, 2]
    scales: torch.Tensor  # [N], the activations' dtype

    @property
    def blocked(self) -> bool:
        return self.q.dim() == 4

    @property
    def shape(self) -> tuple[int, int]:
        if self.blocked:
            return (self.q.shape[0] * INT8_BLOCK, self.q.shape[1] * 2)
        return (self.q.shape[0], self.q.shape[1])

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """The codes of rows start:stop [n, K] (a copy when blocked: then multiples of 16)."""
        if not self.blocked:
            return self.q[start:stop]
        b = self.q[start // INT8_BLOCK:-(-stop // INT8_BLOCK)]
        return b.permute(0, 2, 1, 3).reshape(-1, self.shape[1])[:stop - start]

    def dequantize_rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows start:stop as integers in `out`'s dtype (exact); scales are applied after."""
        return out[:stop - start].copy_(self.rows(start, stop))


@dataclass
class Int4Weight:
    """In ATen's layout, or in cpumesh's int4 kernel's (`blocked`, block_int4):
    packed      `_convert_weight_to_int4pack_for_cpu` of the codes, or blocked codes
                uint8 [N / 16, K / 32, 4, 2, 16, 2] (csrc/group_linear.cpp);
    scale_zeros [K / group, N, 2] (scales, zeros), or blocked [N / 16, K / 32, 2, 16] (each
                group of 32 inputs' scales, then offsets z - 8 s), in the activations' dtype."""

    packed: torch.Tensor
    scale_zeros: torch.Tensor
    group: int
    k: int
    block_n: int | None  # rows per block of the packed layout, when known (see `unpack`)

    @property
    def blocked(self) -> bool:
        return self.packed.dim() == 6

    @property
    def shape(self) -> tuple[int, int]:
        if self.blocked:
            return (self.packed.shape[0] * INT4_BLOCK, self.k)
        return (self.scale_zeros.shape[1], self.k)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zeros.nbytes

    @property
    def dtype(self) -> torch.dtype:
        return self.scale_zeros.dtype

    def dequantize_rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows start:stop (multiples of `block_n`) dequantized into `out`."""
        assert self.block_n is not None
        if self.blocked:
            return self._dequantize_blocked(start, stop, out)
        n, k, b, g = stop - start, self.k, self.block_n, self.group
        p = self.packed[start:stop].view(n // b, k, b // 2)
        codes = torch.cat((p & 15, p >> 4), dim=2).transpose(1, 2).contiguous()  # [n/b, b, K]
        w = out[:n].view(n, k // g, g)
        w.view(n // b, b, k).copy_(codes)
        sz = self.scale_zeros[:, start:stop].transpose(0, 1)  # [n, K / group, 2]
        w.mul_(sz[..., :1]).add_(sz[..., 1:] - 8 * sz[..., :1])
        return out[:n]


    def _dequantize_blocked(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        n, k, b = stop - start, self.k, INT4_BLOCK
        p = self.packed[start // b:stop // b]  # [n/16, K/32, 4, 2, 16, 2]: (c, t, row, e)
        codes = torch.stack((p & 15, p >> 4), dim=3)  # input c * 8 + nibble * 4 + t * 2 + e
        w = out[:n].view(n // b, b, k // 32, 32)
        w.copy_(codes.permute(0, 5, 1, 2, 3, 4, 6).reshape(n // b, b, k // 32, 32))
        sz = self.scale_zeros[start // b:stop // b].permute(0, 3, 1, 2)  # [n/16, 16, K/32, 2]
        w.mul_(sz[..., :1]).add_(sz[..., 1:])
        return out[:n]


def block_int4(codes: Int4Codes, dtype: torch.dtype) -> Int4Weight:
    """`codes` in cpumesh's int4 kernel's layout (see Int4Weight), scales in `dtype`; a group
    of 64 or more inputs gives each of its runs of 32 the same scale and offset."""
    n, k = codes.q.shape
    b, runs = INT4_BLOCK, k // 32
    q = codes.q.view(n // b, b, runs, 4, 2, 2, 2)  # input c * 8 + nibble * 4 + t * 2 + e
    packed = (q[:, :, :, :, 0] | (q[:, :, :, :, 1] << 4)).permute(0, 2, 3, 4, 1, 5).contiguous()
    per = codes.group // 32
    sz = torch.stack((codes.scales, codes.zeros - 8 * codes.scales), dim=1)  # [N, 2, K / g]
    sz = sz.repeat_interleave(per, dim=2).view(n // b, b, 2, runs).permute(0, 3, 2, 1)
    return Int4Weight(packed, sz.contiguous().to(dtype), 32, k, b)


def block_int8(w: Int8Weight) -> Int8Weight:
    """`w` in cpumesh's int8 kernel's blocked layout: 16 rows at a time, their inputs in pairs
    (csrc/int8_linear.cpp); as it is where the shape does not divide so (N % 16, odd K)."""
    n, k = w.shape
    if w.blocked or n % INT8_BLOCK or k % 2:
        return w
    q = w.q.view(n // INT8_BLOCK, INT8_BLOCK, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return Int8Weight(q, w.scales)


QuantWeight = Int8Weight | Int4Weight | Int8GroupWeight
Matrix = torch.Tensor | Int8Weight | Int4Weight | Int8GroupWeight  # what the model multiplies by
INT4: torch.dtype = torch.int4  # type: ignore[attr-defined]  # (missing from torch's stubs)


def finish(codes: Codes, dtype: torch.dtype, int4_blocked: bool = False) -> QuantWeight:
    """Codes in the kernels' layout, scales in `dtype` (the activations'); int4 in cpumesh's
    blocked layout with `int4_blocked` (where its kernel runs), else in ATen's."""
    if isinstance(codes, Int8Codes):
        return Int8Weight(codes.q.contiguous(), codes.scales.to(dtype))
    if isinstance(codes, Int8GroupCodes):
        return block_int8_groups(codes, dtype)
    n, k = codes.q.shape
    if n % 16:
        raise ValueError(f"int4 needs output rows in multiples of 16, got {n}")
    if int4_blocked and codes.group % 32 == 0:
        return block_int4(codes, dtype)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.q.to(torch.int32), 1)
    scale_zeros = torch.stack((codes.scales, codes.zeros), dim=-1).transpose(0, 1).contiguous()
    block = int4_block_n()
    return Int4Weight(packed, scale_zeros.to(dtype), codes.group, k,
                      block if block and n % block == 0 else None)


_BLOCK_N: list[int | None] = []


def int4_block_n() -> int | None:
    """Rows per block of the int4 kernel's packed layout on this CPU, found by packing a probe
    (64 rows with AVX-512, 32 with AVX2, where each byte holds row r of a block in its low
    nibble and row r + block/2 in its high one); None when the layout is none of those."""
    if not _BLOCK_N:
        n, k = 128, 64
        q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0))
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        found = None
        for b in (64, 32, 16):
            v = p.view(n // b, k, b // 2)
            if torch.equal(torch.cat((v & 15, v >> 4), 2).transpose(1, 2).reshape(n, k), q):
                found = b
                break
        _BLOCK_N.append(found)
    return _BLOCK_N[0]


def activations_dtype() -> torch.dtype:
    """bfloat16 where the CPU runs the weight-only kernels' bf16 paths (AVX-512), else float32.

    Measured (H=2048, N=8192 int8, one token): bf16 activations read the weights at ~30 GB/s on
    AVX-512 BF16, float32 activations at 2.7 GB/s; under AVX2 the bf16 paths are emulated."""
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return torch.bfloat16
    return torch.float32
