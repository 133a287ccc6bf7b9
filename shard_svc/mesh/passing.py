"""Collectives by message passing within one formation: the zmq, ipc and tcp data paths.

`MessagePassing.all_reduce` picks the algorithm (configured, or auto: direct below
`ring_min_bytes`, else scatter) and gives it `swap` (send this step's messages, receive this
step's from the peers) and `wait_sent`. DATA travels as ZeroMQ messages on the links, received
by the inbox, or on the tcp streams; the decode path over tcp is `DirectOnStreams`. Shared
memory (shm.py) does not pass messages and is not here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from functools import partial

import torch
import zmq

from shard_svc.mesh.algorithms import Recvs, Sends, direct, ring, scatter
from shard_svc.mesh.communicator import MeshError
from shard_svc.mesh.config import MeshConfig
from shard_svc.mesh.direct import DirectOnStreams
from shard_svc.mesh.inbox import Inbox
from shard_svc.mesh.links import Links
from shard_svc.mesh.tcp import Streams
from shard_svc.mesh.wire import DTYPE_CODES, Algo, data_header

ALGORITHMS = {"direct": direct, "ring": ring, "scatter": scatter}  # message passing, by name


class MessagePassing:
    def __init__(self, config: MeshConfig, links: Links, inbox: Inbox, formation: int,
                 streams: Streams | None) -> None:
        self.config, self.links, self.inbox, self.formation = config, links, inbox, formation
        self.streams = streams
        self.direct = DirectOnStreams(streams, config.tp_rank, config.tp_size, formation,
                                      inbox.service) if streams is not None else None
        self.seq = 0  # the collective in progress
        self._scratch = torch.empty(0, dtype=torch.float32)
        self._trackers: list[tuple[int, zmq.MessageTracker | None]] = []  # zero-copy sends

    def all_reduce(self, flat: torch.Tensor, seq: int) -> None:
        """Sum the flat tensor over all ranks in place, as collective `seq`."""
        self.seq = seq
        algorithm = self.algorithm(flat.numel() * flat.element_size())
        scratch = self._scratch_f32(flat.numel()) if flat.dtype != torch.float32 \
            else self._scratch
        if algorithm is direct and self.direct is not None:  # the decode path
            self.direct(flat, seq, scratch)
        else:
            algorithm(flat, self.config.tp_rank, self.config.tp_size, partial(self.swap, flat),
                      self.wait_sent, self.inbox.release, scratch)

    def algorithm(self, nbytes: int) -> Callable[..., None]:
        """As configured; auto: direct below ring_min_bytes, else scatter."""
        chosen = self.config.algorithm
        if chosen == "auto":
            chosen = "scatter" if nbytes >= self.config.ring_min_bytes else "direct"
        return ALGORITHMS[chosen]

    def _header(self, flat: torch.Tensor, step: int, algo: Algo, nbytes: int,
                sender: int | None = None) -> bytes:
        """The DATA header of message `step` of this collective from `sender` (default: us)."""
        return data_header(flat.dtype, self.config.tp_rank if sender is None else sender, step,
                           algo, self.formation, self.seq, flat.numel(), nbytes)

    def swap(self, flat: torch.Tensor, algo: Algo, step: int, sends: Sends, recvs: Recvs
             ) -> dict[int, torch.Tensor]:
        """Send each (peer, uint8 payload) and receive message `step` of this collective from
        each (peer, nbytes, destination or None: a pooled buffer to `release`). Over ZeroMQ, a
        large send may still be in flight: see `wait_sent`."""
        inbox = self.inbox
        out = [(p, self._header(flat, step, algo, x.numel()), x.numpy().data)
               for p, x in sends]
        if self.streams is not None:
            bufs = {p: dest if dest is not None else inbox.buffer(nb) for p, nb, dest in recvs}
            self.streams.exchange(out, [
                (p, bufs[p].numpy().data, self._header(flat, step, algo, nb, sender=p))
                for p, nb, _ in recvs], inbox.service,
                scratch=all(dest is None for _, _, dest in recvs))
            return bufs
        self._trackers += [(p, self.links.send_data(p, header, data)) for p, header, data in out]
        expect = (flat.numel(), DTYPE_CODES[flat.dtype], algo)
        return {p: inbox.take(self.seq, [p], step, nb, expect, dest)[1]
                for p, nb, dest in recvs}

    def wait_sent(self) -> None:
        """Until libzmq has let go of every zero-copy send (a send to a peer that has gone since,
        e.g. closed after taking all it needed, is not waited for)."""
        trackers, self._trackers = self._trackers, []
        deadline = time.monotonic() + self.config.recv_timeout_s
        for peer, tracker in trackers:
            while tracker is not None and not tracker.done:
                self.inbox.service([])
                if peer in self.inbox.gone:  # it will never be sent; pyzmq keeps the memory
                    break
                if time.monotonic() > deadline:
                    raise MeshError(f"rank {self.config.tp_rank}: a send did not leave within "
                                    f"{self.config.recv_timeout_s:g}s")
                with contextlib.suppress(zmq.NotDone):
                    tracker.wait(0.01)

    def _scratch_f32(self, numel: int) -> torch.Tensor:
        if self._scratch.numel() < numel:
            self._scratch = torch.empty(numel, dtype=torch.float32)
        return self._scratch[:numel]
