"""Forming the mesh: every rank says who it is, checks every peer, and agrees on one formation.

Phase 1: each rank sends HELLO (hello.py: mesh name, rank, world size, fingerprint, algorithm
settings, a fresh nonce, its host and shared-memory segment) to every peer, again every
`hello_interval_s` until that peer has answered, and answers every valid HELLO with its own,
carrying `ack` = the nonce it accepted. A peer with another mesh name, world size, fingerprint,
settings or CURVE key, or whose rank is claimed by a second live process, is refused: its nonce is
banned and the refusal is reported if the mesh does not form.
Phase 2: once every peer is accepted and has accepted us, the formation id is the hash of all
nonces in rank order; each rank maps its peers' shared memory (when all share a host) and sends
READY. A rank returns when READY with that formation id came from every peer; by then every
peer has sent its READY, so no rank is left waiting for one that has already returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import zmq

from shard_svc.mesh.communicator import MeshError
from shard_svc.mesh.config import MeshConfig
from shard_svc.mesh.hello import Hello, parse_hello, refusal, settings
from shard_svc.mesh.links import Links
from shard_svc.mesh.wire import Header, Kind, control, formation_id, parse_body

DUPLICATE_AFTER_S = 0.5  # two nonces still alternating this long after both appeared: duplicate


@dataclass(frozen=True)
class Formation:
    formation: int  # the id in every DATA header of this formation
    hellos: tuple[Hello, ...]  # by rank, ours included
    shm: bool  # every rank mapped every other's shared memory
    streams: bool = False  # no shared memory, and every rank offered a tcp data listener


class Handshake:
    def __init__(self, config: MeshConfig, links: Links, me: Hello,
                 map_shm: Callable[[list[Hello]], bool], timeout_s: float | None = None
                 ) -> None:
        self.cfg, self.links, self.map_shm = config, links, map_shm
        self.timeout_s = config.form_timeout_s if timeout_s is None else timeout_s  # in errors
        self.me = replace(me, rank=config.tp_rank, address=config.peers[config.tp_rank])
        self.settings = settings(config)
        self.hellos: dict[int, Hello] = {}
        self.acked: set[int] = set()
        self.replied: dict[int, str] = {}
        self.refused: dict[int, str] = {}
        self.banned: set[str] = set()
        self.first_seen: dict[str, float] = {}
        self.last_nonce: dict[int, Hello] = {}
        self.ready: dict[int, tuple[int, bool]] = {}
        self.notes: dict[str, int] = {}
        self.sent_at: dict[int, float] = {}
        self.formation: Formation | None = None
        self.early: list[tuple[Header, torch.Tensor]] = []  # DATA of this formation, for Inbox
        self.keys = {k.decode(): r for r, k in links.public_keys.items()}  # z85: the User-Id

    def run(self, deadline: float, stop: Callable[[], bool] = lambda: False) -> Formation:
        """Until formed; MeshError at the deadline, or within a hello interval of `stop()`."""
        others = self.links.others
        while True:
            if self.formation is None and set(self.hellos) == set(others) == self.acked:
                self._enter_phase_two()
            f = self.formation
            if f is not None and all(self.ready.get(r, (None,))[0] == f.formation
                                     for r in others):
                shm = f.shm and all(self.ready[r][1] for r in others)
                return Formation(f.formation, f.hellos, shm,
                                 streams=not shm and all(h.stream for h in f.hellos))
            now = time.monotonic()
            if now > deadline:
                raise self._failure()
            if stop():
                raise MeshError(f"rank {self.cfg.tp_rank}: forming the mesh was interrupted")
            for r in others:
                waiting = r not in self.acked or (f is not None and r not in self.ready)
                if waiting and now - self.sent_at.get(r, 0.0) >= self.cfg.hello_interval_s:
                    self._send_hello(r)
            next_send = min(self.sent_at.values(), default=now) + self.cfg.hello_interval_s
            for event in self.links.wait(min(deadline, next_send) - now):
                if event.lost and event.event != zmq.EVENT_DISCONNECTED:
                    self.notes[event.describe()] = self.notes.get(event.describe(), 0) + 1
            while (raw := self.links.recv_header()) is not None:
                self._handle(raw)

    def _send_hello(self, peer: int) -> None:
        h = self.hellos.get(peer)
        body = {**self.settings, **asdict(self.me), "ack": h.nonce if h else None}
        self.links.send(peer, control(Kind.HELLO, self.cfg.tp_rank, **body))
        self.sent_at[peer] = time.monotonic()
        if h:
            self.replied[peer] = h.nonce

    def _handle(self, raw: bytes) -> None:
        header = Header.unpack(raw)
        if header is None or not self.links.pull or not self.links.pull.rcvmore:
            self.links.skip_rest()
            return
        if header.kind == Kind.HELLO:
            frame = self.links.recv_frame()
            user = str(frame.get("User-Id")) if self.cfg.curve else None
            self.links.skip_rest()
            body = parse_body(frame.bytes)
            if body is not None:
                self._hello(body, user)
        elif header.kind == Kind.REFUSE and header.sender in self.links.others:
            body = parse_body(self.links.recv_body()) or {}
            self.links.skip_rest()
            if body.get("nonce") == self.me.nonce:  # final: our nonce is banned there
                raise MeshError(f"rank {self.cfg.tp_rank} of mesh {self.cfg.mesh_name!r} was "
                                f"refused by rank {header.sender}: {body.get('reason')}",
                                header.sender)
        elif header.kind == Kind.READY and header.sender in self.links.others:
            body = parse_body(self.links.recv_body()) or {}
            self.links.skip_rest()
            self.ready[header.sender] = (header.formation, bool(body.get("shm")))
        elif header.kind == Kind.DATA and self.formation is not None \
                and header.formation == self.formation.formation:
            # The sender already had every READY and started the first collective: keep it.
            buf = torch.empty(header.nbytes, dtype=torch.uint8)
            got = self.links.recv_into(buf.numpy().data)
            self.links.skip_rest()
            if got == header.nbytes:
                self.early.append((header, buf))
        else:  # DATA, ABORT or BYE of an earlier formation
            self.links.skip_rest()

    def _hello(self, body: dict[str, object], user: str | None) -> None:
        h = parse_hello(body)
        if h is None or h.nonce in self.banned:
            return
        now = time.monotonic()
        self.first_seen.setdefault(h.nonce, now)
        reason = refusal(self.cfg, self.settings, h, body, user, self.keys, self.me)
        if reason is None and h.rank in self.last_nonce:
            prev = self.last_nonce[h.rank]
            if prev.nonce != h.nonce and now - self.first_seen[h.nonce] > DUPLICATE_AFTER_S \
                    and now - self.first_seen[prev.nonce] > DUPLICATE_AFTER_S:
                reason = (f"duplicate rank {h.rank}: claimed by pid {prev.pid} on {prev.host} "
                          f"and by pid {h.pid} on {h.host}")
                self.banned.add(prev.nonce)
                self._refuse(prev, reason)
        if reason is not None:
            self.refused[h.rank] = reason
            self.banned.add(h.nonce)
            self._refuse(h, reason)
            if self.hellos.get(h.rank, h).nonce in self.banned:
                self.hellos.pop(h.rank, None)
                self.acked.discard(h.rank)
            return
        self.last_nonce[h.rank] = h
        if self.hellos.get(h.rank) != h:  # new, or restarted: forget what we had
            self.hellos[h.rank] = h
            self.acked.discard(h.rank)
            self.refused.pop(h.rank, None)
            if self.formation is not None:
                self.formation = None  # its nonce changed: the formation id changes too
        if body.get("ack") == self.me.nonce:
            self.acked.add(h.rank)
        if self.replied.get(h.rank) != h.nonce or body.get("ack") != self.me.nonce:
            self._send_hello(h.rank)

    def _refuse(self, h: Hello, reason: str) -> None:
        """Tell the refused process why, at the address it claims (it waits for nothing else)."""
        frames = control(Kind.REFUSE, self.cfg.tp_rank, nonce=h.nonce, reason=reason)
        if h.rank in self.links.others and h.address == self.cfg.peers[h.rank]:
            self.links.send(h.rank, frames)
        elif isinstance(h.address, str) and h.address.rpartition(":")[2].isdigit():
            self.links.send_to(h.address, frames, self.links.public_keys.get(h.rank))

    def _enter_phase_two(self) -> None:
        hellos = [self.hellos.get(r, self.me) for r in range(self.cfg.tp_size)]
        same_host = len({h.host_id for h in hellos}) == 1 and all(h.shm for h in hellos)
        if self.cfg.transport == "shm" and not same_host:
            other = next(h for h in hellos if h.host_id != self.me.host_id or not h.shm)
            raise MeshError(f"transport 'shm' needs every rank on one host with shared memory; "
                            f"rank {other.rank} is on {other.host}", other.rank)
        fid = formation_id([h.nonce for h in hellos])
        shm = same_host and self.map_shm(hellos)
        self.formation = Formation(fid, tuple(hellos), shm)
        for r in self.links.others:
            self.links.send(r, control(Kind.READY, self.cfg.tp_rank, fid, shm=shm))

    def _failure(self) -> MeshError:
        cfg, others = self.cfg, self.links.others
        silent = [r for r in others if r not in self.hellos and r not in self.refused]
        parts = []
        if silent:
            parts.append("no answer from " + ", ".join(
                f"rank {r} ({cfg.peers[r]})" for r in silent))
        unacked = [r for r in others if r in self.hellos and r not in self.acked]
        if unacked:
            parts.append(f"rank(s) {unacked} never accepted us")
        if self.formation is not None:
            unready = [r for r in others if self.ready.get(r, (None,))[0]
                       != self.formation.formation]
            parts.append(f"rank(s) {unready} never became ready")
        parts += [f"refused {reason}" for reason in self.refused.values()]
        parts += [f"{note} ({n}x)" for note, n in self.notes.items()]
        culprit = (silent + sorted(self.refused) + unacked + [None])[0]
        return MeshError(f"rank {cfg.tp_rank} of mesh {cfg.mesh_name!r}: the mesh did not form "
                         f"within {self.timeout_s:g}s: " + "; ".join(parts), culprit)
