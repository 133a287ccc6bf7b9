"""The page table's exact accounting of shared prefix pages (services/page_table.py: the shards'
code, which the router runs as a replica to schedule), against a brute-force model of a shard's
cache written independently: blocks named by the whole token prefix they end (no hashes, no page
numbers, no reference counts), a page held when any live sequence holds its block."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from services.errors import ResourceExhausted
from services.page_table import PageTable

Block = tuple  # a cached block: the prefix ending with it; an own page: ("own", seq_id, index)


class BruteCache:
    """A shard's KV pages as sets: what each live sequence holds, which blocks are cached and
    which cached blocks no sequence holds (evicted oldest first when a page is needed)."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.n, self.s = num_pages, page_size
        self.seqs: dict[int, tuple[list[int], list[Block]]] = {}  # id → (tokens, its pages)
        self.cached: set[Block] = set()  # prefixes of keyed blocks
        self.unheld: OrderedDict[Block, None] = OrderedDict()  # cached, held by none, LRU first
        self._free: int | None = None

    def held(self) -> set[Block]:
        return {b for _, pages in self.seqs.values() for b in pages}

    def free_pages(self) -> int:
        if self._free is None:  # recounted after each change
            self._free = self.n - len(self.held())
        return self._free

    def step(self, steps: list[tuple[int, list[int]]]) -> tuple[int, list[int]]:
        """Run a step (all new sequences match first, then pages are taken in step order);
        return (pages it took from the free ones, cached tokens per sequence)."""
        free0, cached, self._free = self.free_pages(), [], None
        for seq_id, ids in steps:
            if seq_id in self.seqs:
                cached.append(0)
                continue
            pages: list[Block] = []
            while len(pages) < (len(ids) - 1) // self.s:
                block = tuple(ids[:(len(pages) + 1) * self.s])
                if block not in self.cached:
                    break
                pages.append(block)
                self.unheld.pop(block, None)
            self.seqs[seq_id] = ([*ids[:len(pages) * self.s]], pages)
            cached.append(len(pages) * self.s)
        before, held = [], len(self.held())
        for (seq_id, ids), skip in zip(steps, cached, strict=True):
            tokens, pages = self.seqs[seq_id]
            before.append(len(tokens))
            tokens.extend(ids[skip:])
            while len(pages) < -(-len(tokens) // self.s):
                if self.n - held - len(self.unheld) == 0:  # none free: evict the least
                    block, _ = self.unheld.popitem(last=False)  # recently released block
                    self.cached.discard(block)
                pages.append(("own", seq_id, len(pages)))
                held += 1
        # The step ran: the blocks it filled are cached, unless a page caches the same prefix.
        for (seq_id, _), start in zip(steps, before, strict=True):
            tokens, pages = self.seqs[seq_id]
            for b in range(start // self.s, len(tokens) // self.s):
                block = tuple(tokens[:(b + 1) * self.s])
                if pages[b][0] == "own" and block not in self.cached:
                    self.cached.add(block)
                    pages[b] = block
        return free0 - self.free_pages(), cached

    def release(self, seq_id: int) -> None:
        _, pages = self.seqs.pop(seq_id)
        self._free = None
        held = self.held()
        for block in reversed(pages):  # the tail is evicted first
            if block in self.cached and block not in held:
                self.unheld[block] = None


def workload(rng: random.Random, table: PageTable, brute: BruteCache, steps: int) -> int:
    """Random steps of new sequences (behind one of a few shared prefixes) and growing ones,
    random releases; the step either fits both or neither. Returns the steps run."""
    prefixes = [[rng.randrange(4) for _ in range(rng.randint(0, 3 * table.page_size))]
                for _ in range(3)]
    next_id, ran = 0, 0
    for _ in range(steps):
        for seq_id in [s for s in brute.seqs if rng.random() < 0.1]:
            table.release(seq_id)
            brute.release(seq_id)
        step = [(s, [rng.randrange(4)]) for s in brute.seqs if rng.random() < 0.8]
        for _ in range(rng.randint(0, 2)):
            own = [rng.randrange(4) for _ in range(rng.randint(1, 2 * table.page_size))]
            step.append((next_id, rng.choice(prefixes) + own))
            next_id += 1
        if not step:
            continue
        cost, free = table.step_cost(step), table.free_pages
        assert free == brute.free_pages()
        if cost > free:
            with pytest.raises(ResourceExhausted, match="KV cache full"):
                table.reserve(step)
            assert table.free_pages == free  # a refused step changes nothing
            continue
        reservation = table.reserve(step)
        reservation.commit()
        taken, cached = brute.step(step)
        assert (cost, reservation.cached) == (taken, tuple(cached))
        assert table.free_pages == brute.free_pages() == free - cost
        ran += 1
    return ran


@pytest.mark.parametrize("seed", range(40))
def test_the_step_cost_is_exactly_what_the_brute_force_cache_takes(seed: int) -> None:
    rng = random.Random(seed)
    num_pages, page_size = rng.randint(4, 40), rng.choice([1, 2, 4, 8])
    table, brute = PageTable(num_pages, page_size), BruteCache(num_pages, page_size)
    assert workload(rng, table, brute, 150) > 20
    assert table.prefix is not None and len(table.prefix) == len(brute.cached)


@pytest.mark.parametrize("seed", range(40))
def test_a_rank_with_more_pages_takes_every_step_the_smallest_takes(seed: int) -> None:
    """The router schedules with a replica of the smallest rank's table: a larger rank (more
    pages, so it evicts later and caches at least as much) must never run out first."""
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4])
    small = PageTable(rng.randint(4, 24), page_size)
    large = PageTable(small.num_pages + rng.randint(1, 8), page_size)
    prefixes = [[rng.randrange(3) for _ in range(rng.randint(0, 12))] for _ in range(3)]
    live: set[int] = set()
    for next_id in range(300):
        for seq_id in [s for s in sorted(live) if rng.random() < 0.15]:
            small.release(seq_id)
            large.release(seq_id)
            live.discard(seq_id)
        step = [(s, [rng.randrange(3)]) for s in sorted(live) if rng.random() < 0.8]
        step.append((1000 + next_id, rng.choice(prefixes) + [rng.randrange(3)] * rng.randint(1, 8)))
        if small.step_cost(step) <= small.free_pages:
            assert large.step_cost(step) <= large.free_pages
            small.reserve(step).commit()
            large.reserve(step).commit()
            live.update(s for s, _ in step)


def test_shared_and_unheld_cached_pages_cost_what_they_will_take() -> None:
    table = PageTable(8, 4)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # two full blocks and a token
    assert table.new_cost(prompt) == (3, 0, set())  # nothing cached: 3 pages
    table.reserve([(1, prompt)]).commit()
    assert table.new_cost(prompt) == (1, 8, set())  # both blocks held by 1: only its own page
    table.release(1)
    assert table.free_pages == 8
    pages, cached, unheld = table.new_cost(prompt)  # cached but held by none: they stop being
    assert (pages, cached, len(unheld)) == (3, 8, 2)  # free, like fresh ones
    assert table.step_cost([(2, prompt), (3, prompt)]) == 4  # 2 unheld + one own page each
    table.reserve([(2, prompt), (3, prompt)]).commit()
    assert table.free_pages == 4
