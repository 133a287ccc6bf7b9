"""The allreduce algorithms over message passing (tcp, zmq and ipc data paths; shared memory has
its own in shm), written against one primitive:

    swap(algo, step, sends=[(peer, bytes)], recvs=[(peer, nbytes, dest or None)])
        -> {peer: received bytes}

sends each payload to its peer and receives message `step` of the collective from each peer in
`recvs` (into `dest` when given, else into pooled buffers given back with `release`).
`wait_sent()` returns once no send still reads the caller's memory.

direct:  every rank sends its partial to every other, then sums all partials in rank order,
         ((p0 + p1) + p2) + …: the same bits on every rank (and as mesh.sum_in_rank_order).
scatter: reduce-scatter then all-gather, each in one direct exchange: rank c receives chunk c of
         every partial, sums it in rank order as above, and sends the sum to every rank. Each
         rank sends 2(n-1)/n of the tensor (the ring's volume) in two rounds instead of 2(n-1).
ring:    reduce-scatter then all-gather around the ring. Chunk c is summed by its owner, rank c,
         as ((p[c+1] + p[c+2]) + …) + p[c] and then passed on: the same bits on every rank.
bfloat16 is accumulated in float32 and rounded once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from shard_svc.mesh.wire import Algo, chunk_bounds

Sends = list[tuple[int, torch.Tensor]]
Recvs = list[tuple[int, int, torch.Tensor | None]]


class Swap(Protocol):
    def __call__(self, algo: Algo, step: int, sends: Sends, recvs: Recvs
                 ) -> dict[int, torch.Tensor]: ...


def add_in_rank_order(out: torch.Tensor, views: list[torch.Tensor], me: int,
                      scratch: torch.Tensor) -> None:
    """out = ((v0 + v1) + v2) + …, where views[me] is `out` itself; bfloat16 through the
    float32 `scratch` (as many elements as `out`)."""
    if out.dtype == torch.float32:  # accumulated in place
        acc = views[0]
        for r in range(1, len(views)):
            if r == me:
                torch.add(out, acc, out=out)  # a + b == b + a exactly
                acc = out
            else:
                acc += views[r]
    else:
        scratch.copy_(views[0])
        for view in views[1:]:
            scratch += view
        out.copy_(scratch)


def direct(flat: torch.Tensor, me: int, n: int, swap: Swap, wait_sent: Callable[[], None],
           release: Callable[[torch.Tensor], None], scratch: torch.Tensor) -> None:
    raw = flat.view(torch.uint8)
    others = [r for r in range(n) if r != me]
    parts = swap(Algo.DIRECT, 0, [(q, raw) for q in others],
                 [(q, raw.numel(), None) for q in others])
    wait_sent()  # our partial has left before we overwrite it
    add_in_rank_order(flat, [flat if r == me else parts[r].view(flat.dtype) for r in range(n)],
                      me, scratch)
    for buf in parts.values():
        release(buf)


def scatter(flat: torch.Tensor, me: int, n: int, swap: Swap, wait_sent: Callable[[], None],
            release: Callable[[torch.Tensor], None], scratch: torch.Tensor) -> None:
    b, item = chunk_bounds(flat.numel(), n), flat.element_size()
    raw = flat.view(torch.uint8)

    def chunk(c: int) -> torch.Tensor:
        return raw[b[c] * item:b[c + 1] * item]

    others = [(me + k) % n for k in range(1, n)]  # staggered: not all to rank 0 first
    mine = flat[b[me]:b[me + 1]]  # never sent in the first round: summed in place
    parts = swap(Algo.SCATTER, 0, [(q, chunk(q)) for q in others],
                 [(q, chunk(me).numel(), None) for q in others])
    add_in_rank_order(mine, [mine if r == me else parts[r].view(flat.dtype) for r in range(n)],
                      me, scratch[:mine.numel()])
    for buf in parts.values():
        release(buf)
    wait_sent()  # the first round read the chunks that the second overwrites
    swap(Algo.SCATTER, 1, [(q, chunk(me)) for q in others],
         [(q, chunk(q).numel(), chunk(q)) for q in others])
    wait_sent()


def ring(flat: torch.Tensor, r: int, n: int, swap: Swap, wait_sent: Callable[[], None],
         release: Callable[[torch.Tensor], None], scratch: torch.Tensor) -> None:
    nxt, prv = (r + 1) % n, (r - 1) % n
    b = chunk_bounds(flat.numel(), n)
    work = flat if flat.dtype == torch.float32 else scratch
    if work is not flat:
        work.copy_(flat)
    work_bytes, flat_bytes = work.view(torch.uint8), flat.view(torch.uint8)
    for s in range(n - 1):  # reduce-scatter in float32: after it we own chunk r's sum
        send, recv = (r - s - 1) % n, (r - s - 2) % n
        size = (b[send + 1] - b[send]) * 4
        buf = swap(Algo.RING, s, [(nxt, work_bytes[b[send] * 4:][:size])],
                   [(prv, (b[recv + 1] - b[recv]) * 4, None)])[prv]
        work[b[recv]:b[recv + 1]] += buf.view(torch.float32)
        release(buf)
    if work is not flat:
        flat[b[r]:b[r + 1]].copy_(work[b[r]:b[r + 1]])
    item = flat.element_size()
    for s in range(n - 1):  # all-gather: each final chunk straight into its place
        send, recv = (r - s) % n, (r - s - 1) % n
        size = (b[send + 1] - b[send]) * item
        dest = flat_bytes[b[recv] * item:b[recv + 1] * item]
        swap(Algo.RING, n - 1 + s, [(nxt, flat_bytes[b[send] * item:][:size])],
             [(prv, dest.numel(), dest)])
    wait_sent()  # the caller may overwrite the tensor once we return
