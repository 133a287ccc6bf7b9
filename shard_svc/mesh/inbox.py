"""Receiving inside a formed mesh: each DATA payload straight into a preallocated buffer, every wait
bounded, every peer event and control message turned into a `MeshError` naming the peer.

All peers' messages share one PULL socket. A message for a later step or collective (a fast peer
may run ahead) is received into a pooled buffer and kept until asked for; one from an earlier
collective or another formation is dropped unread, never summed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from shard_svc.mesh.communicator import Aborted, ConnectionLost, MeshError, Reforming
from shard_svc.mesh.handshake import Formation
from shard_svc.mesh.hello import parse_hello, refusal, settings
from shard_svc.mesh.links import Links, PeerEvent
from shard_svc.mesh.wire import CODE_DTYPES, Header, Kind, parse_body

Key = tuple[int, int, int]  # (seq, sender, step)
POOL_LIMIT_BYTES = 512 * 1024 * 1024
EVENT_SLICE_S = 0.05  # longest blocking receive between two looks at the peers' events


class Inbox:
    def __init__(self, links: Links, formation: Formation, recv_timeout_s: float,
                 early: Sequence[tuple[Header, torch.Tensor]] = ()) -> None:
        self.data_on_zmq = not (formation.shm or formation.streams)  # else DATA here is noise
        self.links = links
        self.me = links.me
        self.formation = formation
        self.nonces = {h.rank: h.nonce for h in formation.hellos}
        self.settings = settings(links.config)
        self.keys = {k.decode(): r for r, k in links.public_keys.items()}  # z85: the User-Id
        self.strangers = 0  # HELLOs ignored: not from a peer of this mesh (see `_hello`)
        self.timeout_s = recv_timeout_s
        self.stash: dict[Key, tuple[Header, torch.Tensor]] = {
            (h.seq, h.sender, h.step): (h, buf) for h, buf in early}
        self.pool: dict[int, list[torch.Tensor]] = {}
        self.pooled_bytes = 0
        self.gone: dict[int, str] = {}  # peers lost or closed: why
        self.seq = 0  # the collective in progress: DATA of earlier ones is dropped

    def start(self, seq: int) -> None:
        """At the start of collective `seq`: fail at once if a peer is already known gone."""
        self.seq = seq
        if self.gone:
            self.check(list(self.gone))

    def check(self, needed: Sequence[int]) -> None:
        """Raise if a peer we still need a message from is gone (others are remembered: the
        rank that needs them fails and sends ABORT)."""
        for peer in needed:
            if peer in self.gone:  # it died, or closed this mesh to re-form (see `explain`)
                raise ConnectionLost(f"rank {self.me}: rank {peer} {self.gone[peer]}", peer)

    def take(self, seq: int, senders: Sequence[int], step: int, nbytes: int,
             expect: tuple[int, int, int], dest: torch.Tensor | None = None
             ) -> tuple[int, torch.Tensor]:
        """The payload of message (seq, one of `senders`, step) as a uint8 tensor (`dest` when
        given and the message was not already stashed); `expect` = (numel, dtype, algo). `seq`
        is the collective begun with `start`."""
        for sender in senders:
            kept = self.stash.pop((seq, sender, step), None)
            if kept is not None:
                self._validate(kept[0], nbytes, expect)
                if dest is None:
                    return sender, kept[1]
                dest.copy_(kept[1])
                self.release(kept[1])
                return sender, dest
        now = time.monotonic()
        deadline, look = now + self.timeout_s, now + EVENT_SLICE_S
        while True:
            # A blocking receive in slices; the peers' events are read between slices (and at
            # least every slice while other messages keep coming), so a lost peer is noticed
            # within a slice of its monitor event.
            now = time.monotonic()
            if now >= look:
                look = now + EVENT_SLICE_S
                self._events(self.links.events())
                self.check(senders)
            if now >= deadline:
                who = ", ".join(f"rank {r}" for r in senders)
                raise MeshError(f"rank {self.me}: collective {seq} got nothing from {who} "
                                f"within {self.timeout_s:g}s", senders[0])
            raw = self.links.recv_header(min(deadline, look) - now)
            if raw is None:
                look = now  # read the events at once
                continue
            header = Header.unpack(raw)
            if header is None or header.kind != Kind.DATA:
                self._control(header)
                self.check(senders)
                continue
            wanted = header.seq == seq and header.step == step and header.sender in senders
            into = dest if wanted and dest is not None and header.nbytes == nbytes else None
            buf = self._receive(header, into, keep=not wanted)
            if buf is not None and wanted:
                self._validate(header, nbytes, expect)
                return header.sender, buf

    def _receive(self, header: Header, into: torch.Tensor | None = None, keep: bool = True
                 ) -> torch.Tensor | None:
        """The payload of a DATA message into `into`, else into a pooled buffer, kept in the
        stash when `keep`; None when dropped (another formation, an earlier collective, a
        stranger's sender rank)."""
        if header.formation != self.formation.formation or header.seq < self.seq \
                or header.sender not in self.nonces or header.sender == self.me:
            self.links.skip_rest()
            return None
        buf = into if into is not None else self.buffer(header.nbytes)
        got = self.links.recv_into(buf.numpy().data)
        self.links.skip_rest()
        if got != header.nbytes:
            raise MeshError(f"rank {header.sender} sent {got} bytes, its header says "
                            f"{header.nbytes}", header.sender)
        if keep:
            self.stash[(header.seq, header.sender, header.step)] = (header, buf)
        return buf

    def _validate(self, header: Header, nbytes: int, expect: tuple[int, int, int]) -> None:
        numel, dtype, algo = expect
        if (header.numel, header.dtype, header.algo) != expect or header.nbytes != nbytes:
            theirs = CODE_DTYPES.get(header.dtype, header.dtype)
            raise MeshError(
                f"rank {header.sender} reduces {header.numel} {theirs} elements (algorithm "
                f"{header.algo}, {header.nbytes} bytes at step {header.step}); rank {self.me} "
                f"reduces {numel} {CODE_DTYPES[dtype]} (algorithm {algo}, {nbytes} bytes)",
                header.sender)

    def service(self, needed: Sequence[int]) -> None:
        """Without waiting: note peer events and control messages and keep any DATA; raise on
        ABORT or if a peer in `needed` is gone."""
        self._events(self.links.events())
        while (raw := self.links.recv_header()) is not None:
            header = Header.unpack(raw)
            if header is None or header.kind != Kind.DATA:
                self._control(header)
            elif self.data_on_zmq:  # a fast peer's next message, kept for its collective
                self._receive(header)
            else:
                self.links.skip_rest()
        self.check(needed)

    def explain(self, lost: ConnectionLost, grace_s: float) -> MeshError:
        """Why a peer's connection closed (or it began a new mesh): the ABORT that came with it
        (naming the rank that really failed), if one arrives within `grace_s`, else `lost` (the
        peer died or restarted). A rank that aborts sends ABORT on ZeroMQ, then re-forms: it
        closes its connections and sends the new mesh's HELLO, and either can be seen first.
        Other news meanwhile (more HELLOs, peers lost) is read and passed over: the ABORT is
        what names the culprit."""
        deadline = time.monotonic() + grace_s
        while True:
            try:
                self.service([])
            except Aborted as e:
                return e
            except MeshError:
                pass  # e.g. its new formation's HELLO: keep reading
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._events(self.links.wait(left))
        # no ABORT: a peer that began a new mesh while another is gone re-formed because of it
        other = next((p for p in self.gone if p != lost.peer), None)
        if isinstance(lost, Reforming) and other is not None:
            return ConnectionLost(f"rank {self.me}: rank {other} {self.gone[other]}", other)
        return lost

    def farewell(self, timeout_s: float) -> None:
        """After our BYE: wait (bounded) until every peer said BYE or is lost. A peer sends BYE
        only after its last collective, so none is left needing data from our closed socket."""
        deadline = time.monotonic() + timeout_s
        while len(self.gone) < len(self.nonces) - 1 and time.monotonic() < deadline:
            self._events(self.links.wait(deadline - time.monotonic()))
            while (raw := self.links.recv_header()) is not None:
                header = Header.unpack(raw)
                if header is not None and header.kind == Kind.BYE:
                    self._control(header)
                else:
                    self.links.skip_rest()

    def _events(self, events: list[PeerEvent]) -> None:
        for event in events:
            if event.lost and event.peer is not None and event.peer not in self.gone:
                self.gone[event.peer] = event.describe().removeprefix(f"rank {event.peer} ")

    def _control(self, header: Header | None) -> None:
        """ABORT ends the collective, BYE marks its sender gone, a peer's HELLO may end it too
        (see `_hello`); the rest is noise (a late HELLO of ours, an earlier formation's)."""
        if header is None or not self.links.pull or not self.links.pull.rcvmore:
            self.links.skip_rest()
            return
        if header.kind == Kind.HELLO:
            self._hello(header)
            return
        body = parse_body(self.links.recv_body()) or {}
        self.links.skip_rest()
        sender = header.sender
        if header.formation != self.formation.formation:
            return
        if header.kind == Kind.ABORT:
            failed = body.get("failed")
            culprit = failed if isinstance(failed, int) and failed != self.me else sender
            raise Aborted(f"rank {self.me}: rank {sender} aborted collective {header.seq}: "
                          f"{body.get('reason')}", culprit)
        if header.kind == Kind.BYE:
            self.gone[sender] = "closed the mesh"

    def _hello(self, header: Header) -> None:
        """A peer forming a new mesh (restarted, or it saw this one break) ends this one: a
        HELLO that forming would accept (hello.refusal: our settings, its rank at its address
        in our peers list, that rank's CURVE key) with a nonce other than the one that rank
        formed with. Any other HELLO is a stranger's (another group's shard, anyone who reached
        the port, a rank claiming ours): counted and ignored, the formation goes on."""
        frame = self.links.recv_frame()
        user = str(frame.get("User-Id")) if self.links.config.curve else None
        self.links.skip_rest()
        body = parse_body(frame.bytes) or {}
        h = parse_hello(body)
        if h is not None and h.rank == header.sender and h.nonce == self.nonces.get(h.rank):
            return  # a late HELLO of this formation
        if h is None or h.rank != header.sender or \
                refusal(self.links.config, self.settings, h, body, user, self.keys) is not None:
            self.strangers += 1
            return
        raise Reforming(f"rank {self.me}: rank {h.rank} is forming a new mesh", h.rank)

    def buffer(self, nbytes: int) -> torch.Tensor:
        free = self.pool.get(nbytes)
        if free:
            self.pooled_bytes -= nbytes
            return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8)

    def release(self, buf: torch.Tensor) -> None:
        """Give a buffer returned by `take` back to the pool."""
        if self.pooled_bytes + buf.numel() <= POOL_LIMIT_BYTES:
            self.pool.setdefault(buf.numel(), []).append(buf)
            self.pooled_bytes += buf.numel()


