"""The decode path's allreduce on the tcp data path: one direct exchange, lean.

A decode step reduces a few KiB twice per layer, so the Python around the two system calls per
peer is most of the cost (each torch or Python call is ~0.5–1.5 µs; four processes sharing two
cores pay it four times over). Here each peer's receive buffer is kept between collectives, with
its memoryview and typed views made once per message size, and the sum reads them in rank order
(algorithms.add_in_rank_order): the same bits as every other algorithm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shard_svc.mesh.algorithms import add_in_rank_order
from shard_svc.mesh.tcp import Streams
from shard_svc.mesh.wire import Algo, data_header

VIEWS_KEPT = 64  # message sizes whose views are kept (a decode loop uses a handful)
_NOTHING = torch.empty(0)


class DirectOnStreams:
    def __init__(self, streams: Streams, me: int, n: int, formation: int,
                 look: Callable[[list[int]], None]) -> None:
        self.streams, self.me, self.n, self.formation, self.look = (
            streams, me, n, formation, look)
        self.others = [(me + k) % n for k in range(1, n)]  # staggered: not all to rank 0 first
        self.buffers = {p: torch.empty(0, dtype=torch.uint8) for p in self.others}
        self.views: dict[tuple[torch.dtype, int], tuple[list[memoryview], list[torch.Tensor]]] = {}

    def __call__(self, flat: torch.Tensor, seq: int, scratch: torch.Tensor) -> None:
        """Sum `flat` (contiguous, 1-D) over all ranks in place, as collective `seq`."""
        numel, dtype = flat.numel(), flat.dtype
        nbytes = numel * flat.element_size()
        raw, typed = self.views.get((dtype, nbytes)) or self._views(dtype, nbytes)
        me, formation = self.me, self.formation
        header = data_header(dtype, me, 0, Algo.DIRECT, formation, seq, numel, nbytes)
        payload = flat.view(torch.uint8).numpy().data
        self.streams.exchange(
            [(p, header, payload) for p in self.others],
            [(p, raw[p], data_header(dtype, p, 0, Algo.DIRECT, formation, seq, numel, nbytes))
             for p in self.others], self.look, scratch=True)
        typed[me] = flat
        add_in_rank_order(flat, typed, me, scratch)
        typed[me] = _NOTHING  # not keeping the caller's tensor alive

    def _views(self, dtype: torch.dtype, nbytes: int
               ) -> tuple[list[memoryview], list[torch.Tensor]]:
        """Each peer's buffer (grown to `nbytes` if needed) as bytes to receive into and as
        `dtype` elements to add, by rank."""
        for p, buf in self.buffers.items():
            if buf.numel() < nbytes:
                self.buffers[p] = torch.empty(nbytes, dtype=torch.uint8)
                self.views.clear()  # views of the old buffers
        if len(self.views) >= VIEWS_KEPT:
            self.views.clear()
        raw = [memoryview(b"")] * self.n
        typed: list[torch.Tensor] = [_NOTHING] * self.n
        for p, buf in self.buffers.items():
            raw[p] = buf[:nbytes].numpy().data
            typed[p] = buf[:nbytes].view(dtype)
        self.views[(dtype, nbytes)] = (raw, typed)
        return raw, typed
