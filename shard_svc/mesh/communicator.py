"""Communicators: how tensor-parallel ranks add their partial sums.

The model receives a `Communicator` and calls `all_reduce` explicitly, twice per layer. This module
holds the protocol, the single-rank communicator and an in-process multi-rank one (threads) used by
tests. The mesh between processes is `MeshGroup` (group.py).
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import torch


class MeshError(RuntimeError):
    """A collective failed: a peer died, stalled, or sent something it should not have."""

    def __init__(self, message: str, peer: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer


class Aborted(MeshError):
    """A peer's ABORT ended the collective; `peer` is the rank it names as failed."""


class ConnectionLost(MeshError):
    """A peer's data connection closed or failed: it died, or it aborted and tore its mesh
    down to re-form (its ABORT, sent on ZeroMQ first, may arrive after the close is seen)."""


class Reforming(ConnectionLost):
    """A peer sent the HELLO of a new mesh: it restarted, or it saw this mesh break, sent ABORT
    (naming the rank that failed) and re-formed at once; its HELLO can overtake its ABORT."""


class Communicator(Protocol):
    """Sum-allreduce among the ranks of one tensor-parallel group."""

    @property
    def tp_rank(self) -> int: ...

    @property
    def tp_size(self) -> int: ...

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` (contiguous) over all ranks, in place, and return it.

        Every rank ends with bitwise-identical values (partials summed in rank order).
        """
        ...


class SingleRank:
    """tp_size 1: the sum of one partial is itself."""

    tp_rank = 0
    tp_size = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class LocalOnly:
    """Skips the sum: for a warm-up pass whose output is thrown away, so that a rank can warm
    up alone (a restarted rank must not wait for peers that are busy serving)."""

    def __init__(self, tp_rank: int, tp_size: int) -> None:
        self.tp_rank = tp_rank
        self.tp_size = tp_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class ThreadGroup:
    """An in-process group of `tp_size` ranks, one thread each (tests and simulated TP)."""

    def __init__(self, tp_size: int, timeout_s: float = 60.0) -> None:
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        self.tp_size = tp_size
        self._timeout_s = timeout_s
        self._barrier = threading.Barrier(tp_size)
        self._slots: list[torch.Tensor | None] = [None] * tp_size

    def communicator(self, tp_rank: int) -> ThreadCommunicator:
        return ThreadCommunicator(self, tp_rank)

    def _all_reduce(self, tp_rank: int, tensor: torch.Tensor) -> torch.Tensor:
        self._slots[tp_rank] = tensor
        try:
            self._barrier.wait(self._timeout_s)
            parts = [p for p in self._slots if p is not None]
            if len(parts) != self.tp_size:
                raise MeshError("a rank joined the allreduce without a tensor")
            total = sum_in_rank_order(parts)
            self._barrier.wait(self._timeout_s)  # everyone has read every partial
        except threading.BrokenBarrierError as e:
            raise MeshError(f"rank {tp_rank}: allreduce timed out after {self._timeout_s}s") from e
        tensor.copy_(total)
        return tensor


class ThreadCommunicator:
    def __init__(self, group: ThreadGroup, tp_rank: int) -> None:
        if not 0 <= tp_rank < group.tp_size:
            raise ValueError(f"tp_rank {tp_rank} outside 0..{group.tp_size - 1}")
        self._group = group
        self.tp_rank = tp_rank
        self.tp_size = group.tp_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._group._all_reduce(self.tp_rank, tensor)


def sum_in_rank_order(parts: list[torch.Tensor]) -> torch.Tensor:
    """The reference summation: ((p0 + p1) + p2) + …, accumulated in float32 for bfloat16."""
    acc = parts[0].to(torch.float32 if parts[0].dtype == torch.bfloat16 else parts[0].dtype)
    acc = acc.clone()
    for p in parts[1:]:
        acc += p
    return acc.to(parts[0].dtype)


class TimedCommunicator:
    """Wraps a communicator and adds up the time spent inside all_reduce."""

    def __init__(self, inner: Communicator) -> None:
        self.inner = inner
        self.elapsed_s = 0.0

    @property
    def tp_rank(self) -> int:
        return self.inner.tp_rank

    @property
    def tp_size(self) -> int:
        return self.inner.tp_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.inner.all_reduce(tensor)
        finally:
            self.elapsed_s += time.perf_counter() - t0
