"""The KV cache's page table: which pages each sequence holds, which are shared, which are free.

Pure bookkeeping, no tensors, shared by the shard and the router (which counts pages as the
shards hold them). The K and V rows live in shard_svc/kv_cache.py, which addresses them through
this table. A sequence owns a list of pages; token t of a sequence lives in page
pages[t // S] at offset t % S.

Pages are handed out so that a sequence's pages are usually consecutive (its history is then a
view): a sequence's next page is the one after its last when that is free; a new sequence starts
inside the largest run of free pages, leaving room for the sequence before it to grow.

The table owns reservations: `reserve` makes room for one step's tokens (all or nothing) and
returns a `PageReservation` whose `undo` puts the table back as it was, for a step that failed,
and whose `commit` (after the step ran) keys the pages it filled in the prefix cache.

Prefix caching (services/prefix_cache.py, on unless `prefix_cache=False`): a new sequence
starts with the pages of the full blocks of its tokens that the cache already holds, at most
(tokens - 1) // S of them (its last token is always computed); pages count their references,
and a released sequence's keyed pages stay cached, unreferenced, until evicted (least recently
released first) for a page that is needed. They count as free.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass, field

from services.errors import InvalidArgument, NotFound, ResourceExhausted
from services.prefix_cache import ROOT, PrefixCache, block_key


@dataclass
class SeqPages:
    pages: list[int] = field(default_factory=list)
    length: int = 0  # tokens written (or reserved by the step in flight)
    first: int | None = None  # its first page while its pages are consecutive, else None
    tokens: list[int] = field(default_factory=list)  # its token ids, to key its full blocks
    keys: list[bytes] = field(default_factory=list)  # the keys of its first full blocks


@dataclass(frozen=True)
class PageReservation:
    """Room for one step: where each sequence's new tokens start, and how to take it back."""

    table: PageTable
    starts: tuple[int, ...]  # per sequence, in step order: its first new token's position
    added: tuple[int, ...]  # sequences the step created
    lengths: dict[int, int]  # earlier lengths of the sequences that existed
    cached: tuple[int, ...]  # per sequence: its first tokens found in the prefix cache

    def commit(self) -> None:
        """The step ran: key the blocks it filled, for later sequences to reuse."""
        for seq_id in (*self.added, *self.lengths):
            self.table.key_blocks(seq_id)

    def undo(self) -> None:
        for seq_id in self.added:
            self.table.release(seq_id)
        for seq_id, length in self.lengths.items():
            self.table.truncate(seq_id, length)


class PageTable:
    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = True) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = [True] * num_pages
        self._free_count = num_pages
        self._refs = [0] * num_pages  # sequences holding each page
        self._seqs: dict[int, SeqPages] = {}
        self.prefix = PrefixCache() if prefix_cache else None

    # -- accounting -------------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        """Pages no sequence holds: free, or cached and evictable."""
        return self._free_count + (self.prefix.parked if self.prefix else 0)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def seq(self, seq_id: int) -> SeqPages:
        """A sequence's pages (NotFound if unknown); not to be changed by the caller."""
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise NotFound(f"unknown sequence {seq_id}") from None

    def seq_ids(self) -> list[int]:
        return list(self._seqs)

    def pages_needed(self, seq_id: int | None, new_tokens: int) -> int:
        """Pages a sequence (None: a new one) must gain to hold `new_tokens` more tokens."""
        seq = self._seqs.get(seq_id) if seq_id is not None else None
        have = len(seq.pages) if seq else 0
        length = seq.length if seq else 0
        return max(0, -(-(length + new_tokens) // self.page_size) - have)

    def match(self, tokens: Sequence[int]) -> list[int]:
        """The cached pages a new sequence of `tokens` would start with (changes nothing)."""
        if self.prefix is None:
            return []
        return self.prefix.match(tokens, self.page_size, (len(tokens) - 1) // self.page_size)[0]

    def new_cost(self, tokens: Sequence[int], taken: Set[int] = frozenset()
                 ) -> tuple[int, int, set[int]]:
        """What a new sequence of `tokens` takes from `free_pages` now: (pages: one per block
        not found cached, plus the cached pages no sequence holds, which stop being free; its
        first tokens found cached; those unheld cached pages). Pages in `taken` (unheld pages
        that an earlier new sequence of the same step takes) cost nothing more."""
        hits = self.match(tokens)
        unheld = {p for p in hits if self._refs[p] == 0} - taken
        pages = -(-len(tokens) // self.page_size) - len(hits) + len(unheld)
        return pages, len(hits) * self.page_size, unheld

    def step_cost(self, steps: Sequence[tuple[int, Sequence[int]]]) -> int:
        """Pages a step of (seq_id, new token ids) takes from `free_pages`, exactly: the new
        pages its tokens fill and the cached pages its new sequences start to hold (every new
        sequence matches the cache before any page of the step is taken, as `reserve` does)."""
        need, taken = 0, set[int]()
        for seq_id, ids in steps:
            if seq_id in self._seqs:
                need += self.pages_needed(seq_id, len(ids))
            else:
                pages, _, unheld = self.new_cost(ids, taken)
                need, taken = need + pages, taken | unheld
        return need

    def check_room(self, steps: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Raise ResourceExhausted unless every (seq_id, new token ids) of a step fits at once."""
        need = self.step_cost(steps)
        if need > self.free_pages:
            raise ResourceExhausted(
                f"KV cache full: the step needs {need * self.page_size} more token slots, "
                f"{self.free_pages * self.page_size} free of {self.num_pages * self.page_size}"
            )

    # -- mutation ---------------------------------------------------------------------------

    def add(self, seq_id: int) -> None:
        if seq_id in self._seqs:
            raise InvalidArgument(f"sequence {seq_id} already exists")
        self._seqs[seq_id] = SeqPages()

    def reserve(self, steps: Sequence[tuple[int, Sequence[int]]]) -> PageReservation:
        """Room for (seq_id, new token ids) of every sequence of a step, all or nothing;
        sequences not yet in the table are added, starting with the pages of their first blocks
        that the prefix cache holds (`PageReservation.cached`: how many tokens those hold)."""
        self.check_room(steps)
        added = tuple(s for s, _ in steps if s not in self._seqs)
        lengths = {s: self._seqs[s].length for s, _ in steps if s in self._seqs}
        cached = tuple(self._start(s, ids) if s in added else 0 for s, ids in steps)
        starts = tuple(self.extend(s, ids[c:]) for (s, ids), c in zip(steps, cached, strict=True))
        return PageReservation(self, starts, added, lengths, cached)

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

    def extend(self, seq_id: int, tokens: Sequence[int]) -> int:
        """Reserve room for `tokens` (ids) after the sequence's; return the first one's
        position."""
        seq = self.seq(seq_id)
        need = self.pages_needed(seq_id, len(tokens))
        if need > self.free_pages:
            raise ResourceExhausted(f"KV cache full: {self.free_pages * self.page_size} tokens "
                                    f"free")
        for _ in range(need):
            if not self._free_count:
                self._evict()
            self._take(seq, self._next_page(seq, need))
        start = seq.length
        seq.length += len(tokens)
        seq.tokens.extend(tokens)
        return start

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
        seq = self.seq(seq_id)
        seq.length = min(seq.length, length)
        del seq.tokens[seq.length:], seq.keys[seq.length // self.page_size:]
        keep = -(-seq.length // self.page_size)
        while len(seq.pages) > keep:
            self._give_back(seq.pages.pop())
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

    # -- pages ------------------------------------------------------------------------------

    def _next_page(self, seq: SeqPages, need: int) -> int:
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

    def _take(self, seq: SeqPages, page: int) -> None:
        self._free[page] = False
        self._free_count -= 1
        self._refs[page] = 1
        if not seq.pages:
            seq.first = page
        elif seq.first is not None and page != seq.pages[-1] + 1:
            seq.first = None
        seq.pages.append(page)

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
