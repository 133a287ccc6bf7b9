"""The KV cache: a pool of fixed-size pages, preallocated once, shared by all sequences.

Memory is known at start and never grows: `capacity_tokens` (rounded up to whole pages) decides
the size of two tensors per shard, K and V, of shape [L, Hkv, P * S, D] (L layers, Hkv local KV
heads, P pages, S tokens per page, D head dim). A sequence owns a list of pages; token t of a
sequence lives in page pages[t // S] at offset t % S. The "slot" of a token is page * S + offset,
an index into the [Hkv, P * S, D] view of one layer.

Reading a sequence's history costs nothing when its pages are consecutive (a view of each head's
rows): pages are handed out so that they usually are. A sequence's next page is the one after
its last when that is free; a new sequence starts inside the largest run of free pages, leaving
room for the sequence before it to grow. Otherwise its pages are gathered, a page at a time.

The cache owns reservations: `reserve` makes room for one step's tokens (all or nothing) and
returns a `Reservation` whose `undo` puts the cache back as it was, for a step that failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from services.errors import InvalidArgument, NotFound, ResourceExhausted


@dataclass
class _SeqPages:
    pages: list[int] = field(default_factory=list)
    length: int = 0  # tokens written (or reserved by the step in flight)
    first: int | None = None  # its first page while its pages are consecutive, else None
    gather: torch.Tensor | None = None  # int64 [pages], made when first needed


@dataclass(frozen=True)
class Reservation:
    """Room for one step: each sequence's write slots, and how to take it back."""

    cache: KVCache
    writes: tuple[torch.Tensor, ...]  # int64 [new tokens] per sequence, in step order
    added: tuple[int, ...]  # sequences the step created
    lengths: dict[int, int]  # earlier lengths of the sequences that existed

    def undo(self) -> None:
        for seq_id in self.added:
            self.cache.release(seq_id)
        for seq_id, length in self.lengths.items():
            self.cache.truncate(seq_id, length)


class KVCache:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int,
                 capacity_tokens: int, page_size: int = 16,
                 dtype: torch.dtype = torch.float32) -> None:
        if capacity_tokens < 1:
            raise ValueError(f"capacity_tokens must be >= 1, got {capacity_tokens}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.num_pages = -(-capacity_tokens // page_size)
        shape = (num_layers, num_kv_heads, self.num_pages * page_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self._free = [True] * self.num_pages
        self._free_count = self.num_pages
        self._seqs: dict[int, _SeqPages] = {}

    # -- accounting -------------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_tokens(self) -> int:
        return self._free_count * self.page_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def length(self, seq_id: int) -> int:
        return self._get(seq_id).length

    def seq_ids(self) -> list[int]:
        return list(self._seqs)

    def pages_needed(self, seq_id: int | None, new_tokens: int) -> int:
        """Pages a sequence (None: a new one) must gain to hold `new_tokens` more tokens."""
        seq = self._seqs.get(seq_id) if seq_id is not None else None
        have = len(seq.pages) if seq else 0
        length = seq.length if seq else 0
        return max(0, -(-(length + new_tokens) // self.page_size) - have)

    def check_room(self, requests: Sequence[tuple[int | None, int]]) -> None:
        """Raise ResourceExhausted unless every (seq_id or None, new_tokens) fits at once."""
        need = sum(self.pages_needed(s, n) for s, n in requests)
        if need > self._free_count:
            raise ResourceExhausted(
                f"KV cache full: the step needs {need * self.page_size} more token slots, "
                f"{self.free_tokens} free of {self.capacity_tokens}"
            )

    # -- mutation ---------------------------------------------------------------------------

    def add(self, seq_id: int) -> None:
        if seq_id in self._seqs:
            raise InvalidArgument(f"sequence {seq_id} already exists")
        self._seqs[seq_id] = _SeqPages()

    def reserve(self, steps: Sequence[tuple[int, int]]) -> Reservation:
        """Room for (seq_id, new tokens) of every sequence of a step, all or nothing; sequences
        not yet in the cache are added."""
        self.check_room([(s if s in self._seqs else None, n) for s, n in steps])
        added = tuple(s for s, _ in steps if s not in self._seqs)
        lengths = {s: self._seqs[s].length for s, _ in steps if s in self._seqs}
        for seq_id in added:
            self.add(seq_id)
        writes = tuple(self.extend(seq_id, n) for seq_id, n in steps)
        return Reservation(self, writes, added, lengths)

    def extend(self, seq_id: int, new_tokens: int) -> torch.Tensor:
        """Reserve room for `new_tokens` more tokens; return their slots (int64 [new_tokens])."""
        seq = self._get(seq_id)
        need = self.pages_needed(seq_id, new_tokens)
        if need > self._free_count:
            raise ResourceExhausted(f"KV cache full: {self.free_tokens} tokens free")
        for _ in range(need):
            self._take(seq, self._next_page(seq, need))
        start = seq.length
        seq.length += new_tokens
        return self.slots(seq_id, start, seq.length)

    def truncate(self, seq_id: int, length: int) -> None:
        """Undo an `extend` (a step that failed): keep the first `length` tokens."""
        seq = self._get(seq_id)
        seq.length = min(seq.length, length)
        keep = -(-seq.length // self.page_size)
        while len(seq.pages) > keep:
            self._give_back(seq.pages.pop())
        seq.gather = None
        if not seq.pages:
            seq.first = None

    def release(self, seq_id: int) -> int:
        """Free a sequence's pages (idempotent); return the tokens freed."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return 0
        for page in seq.pages:
            self._give_back(page)
        return len(seq.pages) * self.page_size

    def reset(self) -> None:
        for seq_id in list(self._seqs):
            self.release(seq_id)

    # -- addressing -------------------------------------------------------------------------

    def slots(self, seq_id: int, start: int, stop: int) -> torch.Tensor:
        """Slots of tokens start..stop-1 of a sequence, int64 [stop - start]."""
        seq = self._get(seq_id)
        t = torch.arange(start, stop, dtype=torch.int64)
        if seq.first is not None:
            return seq.first * self.page_size + t
        pages = torch.tensor(seq.pages, dtype=torch.int64)
        return pages[t // self.page_size] * self.page_size + t % self.page_size

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, [Hkv, P * S, D] each."""
        return self.k[index], self.v[index]

    def history(self, index: int, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a sequence's tokens so far in one layer, [Hkv, length, D] each: views of
        the cache when its pages are consecutive, else gathered page by page."""
        seq = self._get(seq_id)
        k, v = self.k[index], self.v[index]  # [Hkv, P*S, D]
        if seq.first is not None:
            start = seq.first * self.page_size
            return k[:, start:start + seq.length], v[:, start:start + seq.length]
        if seq.gather is None:
            seq.gather = torch.tensor(seq.pages, dtype=torch.int64)
        h, d, s = k.shape[0], k.shape[2], self.page_size
        ks = k.view(h, -1, s, d).index_select(1, seq.gather).view(h, -1, d)  # [Hkv, pages*S, D]
        vs = v.view(h, -1, s, d).index_select(1, seq.gather).view(h, -1, d)
        return ks[:, :seq.length], vs[:, :seq.length]

    # -- pages ------------------------------------------------------------------------------

    def _next_page(self, seq: _SeqPages, need: int) -> int:
        if seq.pages:
            after = seq.pages[-1] + 1
            if after < self.num_pages and self._free[after]:
                return after
            return self._free.index(True)
        start, length = self._largest_free_run()
        if start == 0 or length <= need:  # a maximal run: the page before it is taken
            return start
        return start + (length - need) // 2  # leave the sequence before it room to grow

    def _largest_free_run(self) -> tuple[int, int]:
        best, best_len, run_start = 0, 0, None
        for page, free in enumerate([*self._free, False]):
            if free and run_start is None:
                run_start = page
            elif not free and run_start is not None:
                if page - run_start > best_len:
                    best, best_len = run_start, page - run_start
                run_start = None
        return best, best_len

    def _take(self, seq: _SeqPages, page: int) -> None:
        self._free[page] = False
        self._free_count -= 1
        if not seq.pages:
            seq.first = page
        elif seq.first is not None and page != seq.pages[-1] + 1:
            seq.first = None
        seq.pages.append(page)
        seq.gather = None

    def _give_back(self, page: int) -> None:
        self._free[page] = True
        self._free_count += 1

    def _get(self, seq_id: int) -> _SeqPages:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise NotFound(f"unknown sequence {seq_id}") from None
