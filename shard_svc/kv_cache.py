"""The KV cache: a pool of fixed-size pages, preallocated once, shared by all sequences.

Memory is known at start and never grows: `capacity_tokens` (rounded up to whole pages) decides
the size of two tensors per shard, K and V, of shape [L, P, S, Hkv, D]
(L layers, P pages, S tokens per page, Hkv local KV heads, D head dim). A sequence owns a list of
pages; token t of a sequence lives in page pages[t // S] at offset t % S. The "slot" of a token is
page * S + offset, an index into the flattened [P * S, Hkv, D] view of one layer.
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
        shape = (num_layers, self.num_pages, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self._free_pages: list[int] = list(range(self.num_pages - 1, -1, -1))
        self._seqs: dict[int, _SeqPages] = {}

    # -- accounting -------------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_tokens(self) -> int:
        return len(self._free_pages) * self.page_size

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
        if need > len(self._free_pages):
            raise ResourceExhausted(
                f"KV cache full: the step needs {need * self.page_size} more token slots, "
                f"{self.free_tokens} free of {self.capacity_tokens}"
            )

    # -- mutation ---------------------------------------------------------------------------

    def add(self, seq_id: int) -> None:
        if seq_id in self._seqs:
            raise InvalidArgument(f"sequence {seq_id} already exists")
        self._seqs[seq_id] = _SeqPages()

    def extend(self, seq_id: int, new_tokens: int) -> torch.Tensor:
        """Reserve room for `new_tokens` more tokens; return their slots (int64 [new_tokens])."""
        seq = self._get(seq_id)
        need = self.pages_needed(seq_id, new_tokens)
        if need > len(self._free_pages):
            raise ResourceExhausted(f"KV cache full: {self.free_tokens} tokens free")
        seq.pages.extend(self._free_pages.pop() for _ in range(need))
        start = seq.length
        seq.length += new_tokens
        return self.slots(seq_id, start, seq.length)

    def truncate(self, seq_id: int, length: int) -> None:
        """Undo an `extend` (a step that failed): keep the first `length` tokens."""
        seq = self._get(seq_id)
        seq.length = min(seq.length, length)
        keep = -(-seq.length // self.page_size)
        while len(seq.pages) > keep:
            self._free_pages.append(seq.pages.pop())

    def release(self, seq_id: int) -> int:
        """Free a sequence's pages (idempotent); return the tokens freed."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return 0
        self._free_pages.extend(reversed(seq.pages))
        return len(seq.pages) * self.page_size

    def reset(self) -> None:
        for seq_id in list(self._seqs):
            self.release(seq_id)

    # -- addressing -------------------------------------------------------------------------

    def slots(self, seq_id: int, start: int, stop: int) -> torch.Tensor:
        """Slots of tokens start..stop-1 of a sequence, int64 [stop - start]."""
        pages = torch.tensor(self._get(seq_id).pages, dtype=torch.int64)
        t = torch.arange(start, stop, dtype=torch.int64)
        return pages[t // self.page_size] * self.page_size + t % self.page_size

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as flattened [P * S, Hkv, D] views."""
        k, v = self.k[index], self.v[index]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])

    def _get(self, seq_id: int) -> _SeqPages:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise NotFound(f"unknown sequence {seq_id}") from None
