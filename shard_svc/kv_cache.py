"""The KV cache: a pool of fixed-size pages, preallocated once, shared by all sequences.

Memory is known at start and never grows: `capacity_tokens` (rounded up to whole pages) decides
the size of two tensors per shard, K and V, of shape [L, Hkv, P * S, D] (L layers, Hkv local KV
heads, P pages, S tokens per page, D head dim), held by a store (shard_svc/kv_store.py): in the
compute dtype, or int8 with a scale per token and head (`dtype=torch.int8`), dequantized on
read. A sequence owns a list of pages; token t of a sequence lives in page pages[t // S] at
offset t % S. The "slot" of a token is page * S + offset, an index into the [Hkv, P * S, D]
view of one layer.

Reading a sequence's history costs nothing when its pages are consecutive (a view of each head's
rows; int8: only its rows are dequantized): pages are handed out so that they usually are. A
sequence's next page is the one after its last when that is free; a new sequence starts inside
the largest run of free pages, leaving room for the sequence before it to grow. Otherwise its
pages are gathered, a page at a time.

The cache owns reservations: `reserve` makes room for one step's tokens (all or nothing) and
returns a `Reservation` whose `undo` puts the cache back as it was, for a step that failed, and
whose `commit` (after the step ran) keys the pages it filled in the prefix cache.

Prefix caching (shard_svc/prefix_cache.py, on unless `prefix_cache=False`): a new sequence
starts with the pages of the full blocks of its tokens that the cache already holds, at most
(tokens - 1) // S of them (its last token is always computed); pages count their references,
and a released sequence's keyed pages stay cached, unreferenced, until evicted (least recently
released first) for a page that is needed. They count as free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from services.errors import InvalidArgument, NotFound, ResourceExhausted
from shard_svc.kv_store import FloatKV, Int8KV
from shard_svc.prefix_cache import ROOT, PrefixCache, block_key


@dataclass
class _SeqPages:
    pages: list[int] = field(default_factory=list)
    length: int = 0  # tokens written (or reserved by the step in flight)
    first: int | None = None  # its first page while its pages are consecutive, else None
    gather: torch.Tensor | None = None  # int64 [pages], made when first needed
    tokens: list[int] = field(default_factory=list)  # its token ids, to key its full blocks
    keys: list[bytes] = field(default_factory=list)  # the keys of its first full blocks


@dataclass(frozen=True)
class Reservation:
    """Room for one step: each sequence's write slots, and how to take it back."""

    cache: KVCache
    writes: tuple[torch.Tensor, ...]  # int64 [new tokens] per sequence, in step order
    added: tuple[int, ...]  # sequences the step created
    lengths: dict[int, int]  # earlier lengths of the sequences that existed
    cached: tuple[int, ...]  # per sequence: its first tokens found in the prefix cache

    def commit(self) -> None:
        """The step ran: key the blocks it filled, for later sequences to reuse."""
        for seq_id in (*self.added, *self.lengths):
            self.cache.key_blocks(seq_id)

    def undo(self) -> None:
        for seq_id in self.added:
            self.cache.release(seq_id)
        for seq_id, length in self.lengths.items():
            self.cache.truncate(seq_id, length)


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
        self._free = [True] * self.num_pages
        self._free_count = self.num_pages
        self._refs = [0] * self.num_pages  # sequences holding each page
        self._seqs: dict[int, _SeqPages] = {}
        self.prefix = PrefixCache() if prefix_cache else None

    # -- accounting -------------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        """Pages no sequence holds: free, or cached and evictable."""
        return self._free_count + (self.prefix.parked if self.prefix else 0)

    @property
    def free_tokens(self) -> int:
        return self.free_pages * self.page_size

    @property
    def nbytes(self) -> int:
        """Bytes of K, V (and int8 scales) allocated."""
        return self.store.nbytes

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
        need = sum(self.pages_needed(s, n) for s, n in requests)  # as if nothing were cached
        if need > self.free_pages:
            raise ResourceExhausted(
                f"KV cache full: the step needs {need * self.page_size} more token slots, "
                f"{self.free_tokens} free of {self.capacity_tokens}"
            )

    # -- mutation ---------------------------------------------------------------------------

    def add(self, seq_id: int) -> None:
        if seq_id in self._seqs:
            raise InvalidArgument(f"sequence {seq_id} already exists")
        self._seqs[seq_id] = _SeqPages()

    def reserve(self, steps: Sequence[tuple[int, Sequence[int]]]) -> Reservation:
        """Room for (seq_id, new token ids) of every sequence of a step, all or nothing;
        sequences not yet in the cache are added, starting with the pages of their first blocks
        that the prefix cache holds (`Reservation.cached`: how many tokens those hold)."""
        self.check_room([(s if s in self._seqs else None, len(ids)) for s, ids in steps])
        added = tuple(s for s, _ in steps if s not in self._seqs)
        lengths = {s: self._seqs[s].length for s, _ in steps if s in self._seqs}
        cached = tuple(self._start(s, ids) if s in added else 0 for s, ids in steps)
        writes = tuple(self.extend(s, ids[c:]) for (s, ids), c in zip(steps, cached, strict=True))
        return Reservation(self, writes, added, lengths, cached)

    def _start(self, seq_id: int, tokens: Sequence[int]) -> int:
        """Add a sequence with the cached pages of its first full blocks; return their tokens."""
        self.add(seq_id)
        if self.prefix is None:
            return 0
        seq = self._seqs[seq_id]
        pages, seq.keys = self.prefix.match(tokens, self.page_size,
                                            (len(tokens) - 1) // self.page_size)
        for page in pages:
            if self._refs[page] == 0:
                self.prefix.take(page)
            self._refs[page] += 1
        seq.pages = pages
        seq.first = pages[0] if pages and pages == list(range(pages[0], pages[-1] + 1)) else None
        seq.length = len(pages) * self.page_size
        seq.tokens = list(tokens[:seq.length])
        return seq.length

    def extend(self, seq_id: int, tokens: Sequence[int]) -> torch.Tensor:
        """Reserve room for `tokens` (ids) after the sequence's; return their slots (int64)."""
        seq = self._get(seq_id)
        need = self.pages_needed(seq_id, len(tokens))
        if need > self.free_pages:
            raise ResourceExhausted(f"KV cache full: {self.free_tokens} tokens free")
        for _ in range(need):
            if not self._free_count:
                self._evict()
            self._take(seq, self._next_page(seq, need))
        start = seq.length
        seq.length += len(tokens)
        seq.tokens.extend(tokens)
        return self.slots(seq_id, start, seq.length)

    def key_blocks(self, seq_id: int) -> None:
        """Key a sequence's full blocks not keyed yet (their KV is computed)."""
        seq = self._seqs.get(seq_id)
        if self.prefix is None or seq is None:
            return
        s = self.page_size
        while len(seq.keys) < seq.length // s:
            b = len(seq.keys)
            seq.keys.append(block_key(seq.keys[-1] if seq.keys else ROOT,
                                      seq.tokens[b * s:(b + 1) * s]))
            self.prefix.insert(seq.keys[-1], seq.pages[b])

    def truncate(self, seq_id: int, length: int) -> None:
        """Undo an `extend` (a step that failed): keep the first `length` tokens."""
        seq = self._get(seq_id)
        seq.length = min(seq.length, length)
        del seq.tokens[seq.length:], seq.keys[seq.length // self.page_size:]
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
        for page in reversed(seq.pages):  # the tail is evicted first
            self._give_back(page)
        return len(seq.pages) * self.page_size

    def reset(self) -> None:
        """Free every sequence and forget every cached block."""
        for seq_id in list(self._seqs):
            self.release(seq_id)
        for page in self.prefix.clear() if self.prefix else ():
            self._free[page] = True
            self._free_count += 1

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
        seq = self._get(seq_id)
        if seq.first is not None:
            start = seq.first * self.page_size
            return self.store.rows(index, start, start + seq.length)
        if seq.gather is None:
            seq.gather = torch.tensor(seq.pages, dtype=torch.int64)
        return self.store.pages(index, seq.gather, self.page_size, seq.length)

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

    def _evict(self) -> None:
        assert self.prefix is not None
        page = self.prefix.evict()
        assert page is not None, "free_pages counted a parked page"
        self._free[page] = True
        self._free_count += 1

    def _take(self, seq: _SeqPages, page: int) -> None:
        self._free[page] = False
        self._free_count -= 1
        self._refs[page] = 1
        if not seq.pages:
            seq.first = page
        elif seq.first is not None and page != seq.pages[-1] + 1:
            seq.first = None
        seq.pages.append(page)
        seq.gather = None

    def _give_back(self, page: int) -> None:
        """A sequence lets a page go: free when no other holds it, unless the prefix cache
        keeps it."""
        self._refs[page] -= 1
        if self._refs[page]:
            return
        if self.prefix is not None and self.prefix.holds(page):
            self.prefix.park(page)
        else:
            self._free[page] = True
            self._free_count += 1

    def _get(self, seq_id: int) -> _SeqPages:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise NotFound(f"unknown sequence {seq_id}") from None
