"""The KV cache: a pool of fixed-size pages, preallocated once, shared by all sequences.

Memory is known at start and never grows: `capacity_tokens` (rounded up to whole pages) decides
the size of two tensors per shard, K and V, of shape [L, Hkv, P * S, D] (L layers, Hkv local KV
heads, P pages, S tokens per page, D head dim), held by a store (shard_svc/kv_store.py): in the
compute dtype, or int8 with a scale per token and head (`dtype=torch.int8`), dequantized on
read. Which pages each sequence holds, which are shared through the prefix cache and which are
free is the page table's (services/page_table.py): token t of a sequence lives in page
pages[t // S] at offset t % S. The "slot" of a token is page * S + offset, an index into the
[Hkv, P * S, D] view of one layer.

Reading a sequence's history costs nothing when its pages are consecutive (a view of each head's
rows; int8: only its rows are dequantized), as the page table usually hands them out; otherwise
its pages are gathered, a page at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.page_table import PageReservation, PageTable
from shard_svc.kv_store import FloatKV, Int8KV


@dataclass(frozen=True)
class Reservation:
    """Room for one step: each sequence's write slots, and how to take it back."""

    cache: KVCache
    pages: PageReservation
    writes: tuple[torch.Tensor, ...]  # int64 [new tokens] per sequence, in step order

    @property
    def cached(self) -> tuple[int, ...]:
        """Per sequence: its first tokens found in the prefix cache."""
        return self.pages.cached

    def commit(self) -> None:
        """The step ran: key the blocks it filled, for later sequences to reuse."""
        self.pages.commit()

    def undo(self) -> None:
        self.pages.undo()
        for seq_id in (*self.pages.added, *self.pages.lengths):
            self.cache.forget_gather(seq_id)


class KVCache:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int,
                 capacity_tokens: int, page_size: int = 16,
                 dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None,
                 prefix_cache: bool = True) -> None:
        """`dtype`: how K and V are stored; `compute_dtype`: how they are read (default: `dtype`,
        float32 for int8)."""
        if capacity_tokens < 1:
            raise ValueError(f"capacity_tokens must be >= 1, got {capacity_tokens}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.num_pages = -(-capacity_tokens // page_size)
        shape = (num_layers, num_kv_heads, self.num_pages * page_size, head_dim)
        if dtype == torch.int8:
            self.store: FloatKV | Int8KV = Int8KV(shape, compute_dtype or torch.float32)
        else:
            self.store = FloatKV(shape, compute_dtype or dtype)
        self.k, self.v = self.store.k, self.store.v  # as stored
        self.dtype = self.store.dtype  # of what reads return
        self.table = PageTable(self.num_pages, page_size, prefix_cache)
        self.prefix = self.table.prefix
        self._gather: dict[int, torch.Tensor] = {}  # int64 [pages] of a scattered sequence

    # -- accounting -------------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        """Pages no sequence holds: free, or cached and evictable."""
        return self.table.free_pages

    @property
    def free_tokens(self) -> int:
        return self.free_pages * self.page_size

    @property
    def nbytes(self) -> int:
        """Bytes of K, V (and int8 scales) allocated."""
        return self.store.nbytes

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.table

    def length(self, seq_id: int) -> int:
        return self.table.seq(seq_id).length

    def seq_ids(self) -> list[int]:
        return self.table.seq_ids()

    def pages_needed(self, seq_id: int | None, new_tokens: int) -> int:
        """Pages a sequence (None: a new one) must gain to hold `new_tokens` more tokens."""
        return self.table.pages_needed(seq_id, new_tokens)

    def check_room(self, steps: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Raise ResourceExhausted unless every (seq_id, new token ids) of a step fits at once
        (the pages its new sequences find in the prefix cache counted as they will be)."""
        self.table.check_room(steps)

    # -- mutation ---------------------------------------------------------------------------

    def add(self, seq_id: int) -> None:
        self.table.add(seq_id)

    def reserve(self, steps: Sequence[tuple[int, Sequence[int]]]) -> Reservation:
        """Room for (seq_id, new token ids) of every sequence of a step, all or nothing;
        sequences not yet in the cache are added, starting with the pages of their first blocks
        that the prefix cache holds (`Reservation.cached`: how many tokens those hold)."""
        pages = self.table.reserve(steps)
        writes = tuple(self.slots(s, start, self.length(s))
                       for (s, _), start in zip(steps, pages.starts, strict=True))
        return Reservation(self, pages, writes)

    def extend(self, seq_id: int, tokens: Sequence[int]) -> torch.Tensor:
        """Reserve room for `tokens` (ids) after the sequence's; return their slots (int64)."""
        start = self.table.extend(seq_id, tokens)
        return self.slots(seq_id, start, self.length(seq_id))

    def truncate(self, seq_id: int, length: int) -> None:
        """Undo an `extend` (a step that failed): keep the first `length` tokens."""
        self.table.truncate(seq_id, length)
        self.forget_gather(seq_id)

    def release(self, seq_id: int) -> int:
        """Free a sequence's pages (idempotent); return the tokens freed."""
        self.forget_gather(seq_id)
        return self.table.release(seq_id)

    def reset(self) -> None:
        """Free every sequence and forget every cached block."""
        self.table.reset()
        self._gather.clear()

    def forget_gather(self, seq_id: int) -> None:
        self._gather.pop(seq_id, None)

    # -- addressing -------------------------------------------------------------------------

    def slots(self, seq_id: int, start: int, stop: int) -> torch.Tensor:
        """Slots of tokens start..stop-1 of a sequence, int64 [stop - start]."""
        seq = self.table.seq(seq_id)
        t = torch.arange(start, stop, dtype=torch.int64)
        if seq.first is not None:
            return seq.first * self.page_size + t
        pages = torch.tensor(seq.pages, dtype=torch.int64)
        return pages[t // self.page_size] * self.page_size + t % self.page_size

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as stored, [Hkv, P * S, D] each (a float cache only)."""
        if self.k.dtype == torch.int8:
            raise TypeError("an int8 KV cache is read through history() or select()")
        return self.k[index], self.v[index]

    def write(self, index: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """A step's new K and V of one layer, [N, Hkv, D] each, into `slots` (int64 [N])."""
        self.store.write(index, slots, k, v)

    def rotate_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Queries [..., D] in the basis reads return K in (int8: rotated; see kv_store)."""
        return self.store.rotate_queries(q)

    def select(self, index: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of any slots (int64 [n]) of one layer, [Hkv, n, D] each."""
        return self.store.select(index, slots)

    def history(self, index: int, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a sequence's tokens so far in one layer, [Hkv, length, D] each: views of
        the cache when its pages are consecutive, else gathered page by page."""
        seq = self.table.seq(seq_id)
        if seq.first is not None:
            start = seq.first * self.page_size
            return self.store.rows(index, start, start + seq.length)
        gather = self._gather.get(seq_id)
        if gather is None or len(gather) != len(seq.pages):  # pages are only ever appended
            gather = self._gather[seq_id] = torch.tensor(seq.pages, dtype=torch.int64)
        return self.store.pages(index, gather, self.page_size, seq.length)
