"""The tcp data path: one plain TCP connection per pair of ranks, carrying only DATA.

ZeroMQ moves every message through its I/O thread: the sender's thread hands it over, the I/O
thread writes the socket, the peer's I/O thread reads it and wakes the peer's thread. On loopback
that costs ~50 µs per exchange of 2 KiB; a kernel socket written and read by the ranks' own
threads costs ~10 µs. So, once the ZeroMQ handshake has formed the mesh, each pair of ranks opens
a TCP connection (mesh_stream_open). Everything else — handshake, heartbeats, ABORT, BYE, and the
detection of a hung peer — stays on ZeroMQ.

Each DATA message is the 32-byte mesh header (mesh_wire) followed by the tensor bytes, sent
straight from the tensor's memory with one `sendmsg` and, once its header is checked, received
straight into its destination. Per pair the stream is ordered and belongs to one formation, so the
next message from a peer is always the one expected; anything else is a broken mesh. A peer that
dies closes its connection (an error at once); one that hangs is caught by ZeroMQ's heartbeats,
looked at every LOOK_S while we wait. The bytes travel unencrypted: with CURVE the data stays on
ZeroMQ (transport zmq).
"""

from __future__ import annotations

import errno
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shard_svc.mesh import MeshError
from shard_svc.mesh_stream_open import open_streams
from shard_svc.mesh_wire import HEADER, Header

LOOK_S = 0.05  # the longest time between two looks at ZeroMQ (peer events, ABORT)


@dataclass(slots=True)
class _Transfer:
    peer: int
    views: list[memoryview]  # what is left to send, or to receive into
    header: bytearray | None = None  # receives: the header's buffer, filled and checked first
    dest: memoryview | None = None  # receives: where the payload goes once the header is good
    expect: bytes = b""  # receives: the header it must be, byte for byte


class Streams:
    def __init__(self, socks: dict[int, socket.socket], me: int, formation: int,
                 timeout_s: float) -> None:
        self.socks, self.me, self.formation, self.timeout_s = socks, me, formation, timeout_s
        self.poller = select.poll()

    @classmethod
    def open(cls, listener: socket.socket, addresses: Sequence[str], me: int, formation: int,
             deadline: float, timeout_s: float) -> Streams:
        """Connect to every lower rank, accept every higher one (see mesh_stream_open)."""
        socks = open_streams(listener, addresses, me, formation, deadline)
        for s in socks.values():
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(socks, me, formation, timeout_s)

    def exchange(self, sends: Sequence[tuple[int, bytes, memoryview]],
                 recvs: Sequence[tuple[int, memoryview, bytes]],
                 look: Callable[[list[int]], None]) -> None:
        """Send each (peer, header, payload) and receive each (peer, destination, the header
        it must come with) concurrently. Fails when no byte
        moves for `timeout_s`; `look(peers)` runs at least every LOOK_S and raises if ZeroMQ
        reports one of them lost, or an ABORT. A received header is checked before any payload
        byte is written to its destination. (Trying each receive before the first wait was
        measured slower at tp 4.)"""
        pending = [_Transfer(p, [memoryview(h), payload]) for p, h, payload in sends]
        pending = [t for t in pending if not self._send(t)]  # most leave at once
        for peer, dest, expect in recvs:
            header = bytearray(HEADER.size)
            pending.append(_Transfer(peer, [memoryview(header)], header, dest, expect))
        now = time.monotonic()
        deadline, next_look = now + self.timeout_s, now + LOOK_S
        while pending:
            if now >= next_look:
                look(sorted({t.peer for t in pending}))
                next_look = now + LOOK_S
            if now >= deadline:
                peers = sorted({t.peer for t in pending})
                who = ", ".join(f"rank {p}" for p in peers)
                raise MeshError(f"rank {self.me}: no data moved to or from {who} within "
                                f"{self.timeout_s:g}s", peers[0])
            ready = dict(self._wait(pending, min(deadline, next_look) - now))
            still = []
            for t in pending:
                if self.socks[t.peer].fileno() in ready and (
                        self._send(t) if t.header is None else self._recv(t)):
                    continue
                still.append(t)
            now = time.monotonic()
            if ready:
                deadline = now + self.timeout_s  # data moved
            pending = still

    def _wait(self, pending: list[_Transfer], timeout_s: float) -> list[tuple[int, int]]:
        """Poll the sockets of the pending transfers (readable for receives, writable for
        sends) for up to `timeout_s`."""
        masks: dict[int, int] = {}
        for t in pending:
            fd = self.socks[t.peer].fileno()
            masks[fd] = masks.get(fd, 0) | (select.POLLIN if t.header is not None
                                            else select.POLLOUT)
        for fd, mask in masks.items():
            self.poller.register(fd, mask)
        try:
            return self.poller.poll(max(1, int(timeout_s * 1000)))
        finally:
            for fd in masks:
                self.poller.unregister(fd)

    def _send(self, t: _Transfer) -> bool:
        try:
            n = self.socks[t.peer].sendmsg(t.views)
        except BlockingIOError:
            return False
        except OSError as e:
            raise self._lost(t.peer, e) from e
        return _advance(t.views, n)

    def _recv(self, t: _Transfer) -> bool:
        """Receive what is there: the header until complete (then check it), then the payload
        straight into its destination."""
        sock = self.socks[t.peer]
        while t.views:
            try:
                n = sock.recv_into(t.views[0])
            except BlockingIOError:
                return False
            except OSError as e:
                raise self._lost(t.peer, e) from e
            if n == 0:
                raise self._lost(t.peer, None)
            if _advance(t.views, n) and t.dest is not None:  # the header is complete
                self._check(t)
                t.views, t.dest = ([t.dest] if t.dest.nbytes else []), None
        return True

    def _check(self, t: _Transfer) -> None:
        assert t.header is not None
        if t.header != t.expect:
            got, want = (Header._make(HEADER.unpack(h)) for h in (t.header, t.expect))
            raise MeshError(f"rank {self.me}: rank {t.peer} sent {got}, expected {want}", t.peer)

    def _lost(self, peer: int, error: OSError | None) -> MeshError:
        why = "closed its data connection" if error is None or error.errno in (
            errno.ECONNRESET, errno.EPIPE) else f"data connection failed: {error}"
        return MeshError(f"rank {self.me}: rank {peer} {why}", peer)

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks = {}


def _advance(views: list[memoryview], n: int) -> bool:
    """Drop `n` transferred bytes from the front of `views`; True when none are left."""
    while views and n >= views[0].nbytes:
        n -= views[0].nbytes
        views.pop(0)
    if views and n:
        views[0] = views[0][n:]
    while views and views[0].nbytes == 0:
        views.pop(0)
    return not views
