"""Where the KV cache's numbers lie: K and V of every layer, as computed or as int8.

Both stores hold K and V as [L, Hkv, P * S, D] (a slot is a row of one head) and answer the
same four questions: write rows at slots, read a run of rows, read whole pages, read any slots.
Reads come back in the compute dtype, [Hkv, n, D].

`FloatKV` keeps K and V in the compute dtype; a read of a run of rows is a view.

`Int8KV` (`--kv-dtype int8`; the companion paper's KV, arXiv 2407.07304) keeps each row, one
token of one head, as int8 with its own float32 scale: scale = max |x| / 127, q = round(x /
scale), so every element is within scale / 2 of its value. Scales are [L, Hkv, P * S] beside K
and V. A read dequantizes only the rows asked for (q * scale, in float32, then the compute
dtype). Bytes per token and layer and KV head: 2 * (D + 4), against 2 * 4 * D in float32
(D = 64: 3.76x as many tokens per byte; D = 128: 3.88x).

K has a few channels far larger than the rest (in every token), which a scale per row spends
its 8 bits on. So K is stored rotated by a fixed orthonormal R (`rotation`: random signs, then
Hadamard blocks, as QuaRot does), which spreads each channel over all of them, and reads return
it rotated: attention rotates the queries the same way (`rotate_queries`), and
(q R)(k R)^T = q k^T. The signs matter: plain Hadamard's first row is all ones, so it folds what
K's channels share into one channel, an outlier again. On SmolLM2 (bench/quality.py) the
rotation takes the top-1 flips K's rounding causes from 2.7 % to about 1 %; V needs none.
"""

from __future__ import annotations

import torch

from shard_svc import huge_pages

QMAX = 127


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [..., D] → int8 [..., D] and their float32 scales [...] (max |x| / 127)."""
    x = x.float()
    scale = x.abs().amax(-1) / QMAX
    tiny = torch.finfo(torch.float32).tiny  # a zero row: 0 / tiny = 0
    q = torch.round(x / scale.clamp_min(tiny).unsqueeze(-1)).clamp_(-QMAX, QMAX)
    return q.to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., D] and scales [...] → [..., D] in `dtype`."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def hadamard(d: int) -> torch.Tensor:
    """An orthonormal [D, D]: Sylvester Hadamard blocks of the largest power of two dividing
    D, each divided by the square root of its size (symmetric: H H = I)."""
    n = d & -d
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return torch.block_diag(*[h / n ** 0.5] * (d // n))


def rotation(d: int, seed: int = 0) -> torch.Tensor:
    """K's rotation R [D, D], float32: diag(random signs) @ `hadamard(d)`, R R^T = I; the same
    on every rank and every run (a fixed seed)."""
    signs = torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return signs.float().unsqueeze(1) * hadamard(d)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    """Bytes one token takes in a cache of K and V stored as `dtype` (int8: with its scales)."""
    row = head_dim + 4 if dtype == torch.int8 else head_dim * dtype.itemsize
    return 2 * num_layers * num_kv_heads * row


class FloatKV:
    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
        self.dtype = dtype  # of reads
        self.k = huge_pages.zeros(shape, dtype)
        self.v = huge_pages.zeros(shape, dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [N, Hkv, D] into rows `slots` (int64 [N])."""
        self.k[layer].index_copy_(1, slots, k.transpose(0, 1).to(self.k.dtype))
        self.v[layer].index_copy_(1, slots, v.transpose(0, 1).to(self.v.dtype))

    def rows(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows start..stop-1 of every head, [Hkv, n, D] (views)."""
        return self.k[layer, :, start:stop], self.v[layer, :, start:stop]

    def pages(self, layer: int, pages: torch.Tensor, page_size: int,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` rows of the pages `pages` (int64) in order, [Hkv, length, D]."""
        return (_pages(self.k[layer], pages, page_size)[:, :length],
                _pages(self.v[layer], pages, page_size)[:, :length])

    def select(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `slots` (int64 [n]), [Hkv, n, D]."""
        return self.k[layer].index_select(1, slots), self.v[layer].index_select(1, slots)

    def rotate_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Queries [..., D] in the basis K is read in (here K's own)."""
        return q


class Int8KV:
    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
        self.dtype = dtype  # of reads
        self.k = huge_pages.zeros(shape, torch.int8)
        self.v = huge_pages.zeros(shape, torch.int8)
        self.k_scale = huge_pages.zeros(shape[:3], torch.float32)  # [L, Hkv, P*S]
        self.v_scale = huge_pages.zeros(shape[:3], torch.float32)
        self.rotation = rotation(shape[3])  # of K's rows, float32 [D, D]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k, self.v, self.k_scale, self.v_scale))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k (rotated), v [N, Hkv, D], quantized per row, into rows `slots` (int64 [N])."""
        k = k.float() @ self.rotation
        for data, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, scale = quantize(x.transpose(0, 1))  # [Hkv, N, D], [Hkv, N]
            data[layer].index_copy_(1, slots, q)
            scales[layer].index_copy_(1, slots, scale)

    def rotate_queries(self, q: torch.Tensor) -> torch.Tensor:
        return (q.float() @ self.rotation).to(q.dtype)

    def rows(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize(self.k[layer, :, start:stop], self.k_scale[layer, :, start:stop],
                           self.dtype),
                dequantize(self.v[layer, :, start:stop], self.v_scale[layer, :, start:stop],
                           self.dtype))

    def pages(self, layer: int, pages: torch.Tensor, page_size: int,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(  # type: ignore[return-value]
            dequantize(_pages(data[layer], pages, page_size)[:, :length],
                       _pages(scales[layer].unsqueeze(-1), pages, page_size)[:, :length, 0],
                       self.dtype)
            for data, scales in ((self.k, self.k_scale), (self.v, self.v_scale)))

    def select(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize(self.k[layer].index_select(1, slots),
                           self.k_scale[layer].index_select(1, slots), self.dtype),
                dequantize(self.v[layer].index_select(1, slots),
                           self.v_scale[layer].index_select(1, slots), self.dtype))


def _pages(x: torch.Tensor, pages: torch.Tensor, page_size: int) -> torch.Tensor:
    """[Hkv, P*S, D] → the rows of `pages` in order, [Hkv, pages * S, D]."""
    h, d = x.shape[0], x.shape[2]
    return x.view(h, -1, page_size, d).index_select(1, pages).view(h, -1, d)
