"""The two allreduce algorithms over message passing (tcp, zmq and ipc data paths; shared memory
has its own in mesh_shm), written against one primitive:

    swap(algo, step, send_to, payload, recv_from, nbytes, dest) -> {peer: received bytes}

sends `payload` to every rank in `send_to` and receives message `step` of the collective from
every rank in `recv_from` (into `dest` when given, else into pooled buffers given back with
`release`). `wait_sent()` returns once no send still reads the caller's memory.

direct: every rank sends its partial to every other, then sums all partials in rank order:
    ((p0 + p1) + p2) + …, the same bits on every rank (shm's `sum_in_rank_order` too).
ring: reduce-scatter then all-gather. Chunk c is summed by its owner, rank c, as
    ((p[c+1] + p[c+2]) + …) + p[c] and then copied to everyone: the same bits on every rank.
bfloat16 is accumulated in float32 and rounded once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from shard_svc.mesh_wire import Algo, chunk_bounds


class Swap(Protocol):
    def __call__(self, algo: Algo, step: int, send_to: list[int], payload: torch.Tensor,
                 recv_from: list[int], nbytes: int, dest: torch.Tensor | None = None
                 ) -> dict[int, torch.Tensor]: ...


def direct(flat: torch.Tensor, me: int, n: int, swap: Swap, wait_sent: Callable[[], None],
           release: Callable[[torch.Tensor], None], scratch: torch.Tensor) -> None:
    raw = flat.view(torch.uint8)
    others = [r for r in range(n) if r != me]
    parts = swap(Algo.DIRECT, 0, others, raw, others, raw.numel())
    wait_sent()  # our partial has left before we overwrite it
    views = [flat if r == me else parts[r].view(flat.dtype) for r in range(n)]
    if flat.dtype == torch.float32:  # accumulated in place
        acc = views[0]
        for r in range(1, n):
            if r == me:
                torch.add(flat, acc, out=flat)  # a + b == b + a exactly
                acc = flat
            else:
                acc += views[r]
    else:
        acc = scratch
        acc.copy_(views[0])
        for view in views[1:]:
            acc += view
        flat.copy_(acc)
    for buf in parts.values():
        release(buf)


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
        buf = swap(Algo.RING, s, [nxt], work_bytes[b[send] * 4:][:size], [prv],
                   (b[recv + 1] - b[recv]) * 4)[prv]
        work[b[recv]:b[recv + 1]] += buf.view(torch.float32)
        release(buf)
    if work is not flat:
        flat[b[r]:b[r + 1]].copy_(work[b[r]:b[r + 1]])
    item = flat.element_size()
    for s in range(n - 1):  # all-gather: each final chunk straight into its place
        send, recv = (r - s) % n, (r - s - 1) % n
        size = (b[send + 1] - b[send]) * item
        dest = flat_bytes[b[recv] * item:b[recv + 1] * item]
        swap(Algo.RING, n - 1 + s, [nxt], flat_bytes[b[send] * item:][:size], [prv],
             dest.numel(), dest)
    wait_sent()  # the caller may overwrite the tensor once we return
