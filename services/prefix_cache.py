"""The prefix cache: which KV pages hold which full blocks of tokens, for reuse across sequences.

A block is one page of tokens (S of them). Its key chains the tokens of every block before it,
key_i = blake2b(key_{i-1} || tokens of block i), so two sequences share a block's page only
when all their tokens up to its end are equal. Only full blocks are keyed; a sequence's last,
partly filled page is its own, so a shared page is never written again.

Pages are counted by the KV cache (references from live sequences). A keyed page whose last
sequence was released stays here, unreferenced ("parked"), until a new sequence reuses it or the
cache needs a page and evicts the least recently parked one. Every rank sees the same steps in
the same order, so every rank's prefix cache holds the same blocks.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

ROOT = b""


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a block of `tokens` after the blocks whose last key is `parent`."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class PrefixCache:
    def __init__(self) -> None:
        self._page_of: dict[bytes, int] = {}  # block key → the page holding it
        self._key_of: dict[int, bytes] = {}  # page → its block key
        self._parked: OrderedDict[int, None] = OrderedDict()  # unreferenced, oldest first

    def __len__(self) -> int:
        return len(self._page_of)

    @property
    def parked(self) -> int:
        """Keyed pages no sequence references: free to evict."""
        return len(self._parked)

    def holds(self, page: int) -> bool:
        return page in self._key_of

    def match(self, tokens: Sequence[int], page_size: int, max_blocks: int
              ) -> tuple[list[int], list[bytes]]:
        """The pages (and keys) of the longest run of `tokens`' first blocks found here, at most
        `max_blocks`. Nothing changes: `take` the pages to use them."""
        pages: list[int] = []
        keys: list[bytes] = []
        parent = ROOT
        for b in range(max_blocks):
            key = block_key(parent, tokens[b * page_size:(b + 1) * page_size])
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
            keys.append(key)
            parent = key
        return pages, keys

    def take(self, page: int) -> None:
        """A sequence references a keyed page: it is no longer evictable."""
        self._parked.pop(page, None)

    def insert(self, key: bytes, page: int) -> bool:
        """Key a full page; False (nothing changes) if the block is held by another page."""
        if key in self._page_of:
            return False
        self._page_of[key] = page
        self._key_of[page] = key
        return True

    def park(self, page: int) -> None:
        """The last sequence referencing a keyed page let it go: keep it, evictable."""
        self._parked[page] = None

    def evict(self) -> int | None:
        """Forget the least recently parked page and return it (None when none is parked)."""
        if not self._parked:
            return None
        page, _ = self._parked.popitem(last=False)
        del self._page_of[self._key_of.pop(page)]
        return page

    def forget(self, page: int) -> None:
        """Un-key a page (its contents are no longer valid)."""
        key = self._key_of.pop(page, None)
        if key is not None:
            del self._page_of[key]
        self._parked.pop(page, None)

    def clear(self) -> list[int]:
        """Forget everything; return the pages that were parked (now free)."""
        parked = list(self._parked)
        self._page_of.clear()
        self._key_of.clear()
        self._parked.clear()
        return parked
