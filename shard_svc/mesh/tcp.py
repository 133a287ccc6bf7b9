"""The tcp data path: one plain TCP connection per pair of ranks, carrying only DATA.

ZeroMQ moves every message through its I/O thread: the sender's thread hands it over, the I/O
thread writes the socket, the peer's I/O thread reads it and wakes the peer's thread. On loopback
that costs ~50 µs per exchange of 2 KiB; a kernel socket written and read by the ranks' own
threads costs ~10 µs. So, once the ZeroMQ handshake has formed the mesh, each pair of ranks opens
a TCP connection (tcp_open). Everything else — handshake, heartbeats, ABORT, BYE, and the
detection of a hung peer — stays on ZeroMQ.

Each DATA message is the 32-byte mesh header (wire) followed by the tensor bytes, sent
straight from the tensor's memory with one `sendmsg` and, once its header is checked, received
straight into its destination. Per pair the stream is ordered and belongs to one formation, so the
next message from a peer is always the one expected; anything else is a broken mesh. A peer that
dies closes its connection (an error at once); one that hangs is caught by ZeroMQ's heartbeats,
looked at every LOOK_S while we wait. The bytes travel unencrypted: with CURVE the data stays on
ZeroMQ (transport zmq).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable, Sequence

from shard_svc.mesh.communicator import ConnectionLost, MeshError
from shard_svc.mesh.tcp_open import open_streams
from shard_svc.mesh.wire import HEADER, Header

LOOK_S = 0.05  # the longest time between two looks at ZeroMQ (peer events, ABORT)
_yield = getattr(os, "sched_yield", lambda: None)


class _Incoming:
    """A message being received: what is left to read into; its header until it is checked."""

    __slots__ = ("dest", "expect", "header", "header_left", "views")

    def __init__(self, header: bytearray, dest: memoryview, expect: bytes, scratch: bool
                 ) -> None:
        self.header = header  # the peer's header buffer (one message at a time per peer)
        self.header_left = len(header)
        self.expect = expect  # the header it must be, byte for byte
        # A scratch destination may take the payload before the header is checked (one read
        # for both); any other gets it only once the header is good.
        self.views = [memoryview(header), dest] if scratch else [memoryview(header)]
        self.dest: memoryview | None = None if scratch else dest


class Streams:
    def __init__(self, socks: dict[int, socket.socket], me: int, formation: int,
                 timeout_s: float, spin_s: float = 0.0) -> None:
        self.socks, self.me, self.formation, self.timeout_s = socks, me, formation, timeout_s
        self.spin_s = spin_s
        self.fds = {peer: s.fileno() for peer, s in socks.items()}
        self.peer_of = {fd: peer for peer, fd in self.fds.items()}
        self.headers = {peer: bytearray(HEADER.size) for peer in socks}
        self.poller = select.poll()
        self.masks = dict.fromkeys(socks, 0)  # what the poller watches each peer's socket for

    @classmethod
    def open(cls, listener: socket.socket, addresses: Sequence[str], me: int, formation: int,
             deadline: float, timeout_s: float, spin_s: float = 0.0) -> Streams:
        """Connect to every lower rank, accept every higher one (see tcp_open)."""
        socks = open_streams(listener, addresses, me, formation, deadline)
        for s in socks.values():
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(socks, me, formation, timeout_s, spin_s)

    def exchange(self, sends: Sequence[tuple[int, bytes, memoryview]],
                 recvs: Sequence[tuple[int, memoryview, bytes]],
                 look: Callable[[list[int]], None], scratch: bool = False) -> None:
        """Send each (peer, header, payload) and receive each (peer, destination, the header
        it must come with) concurrently. A received header is checked before any payload
        byte is written to its destination, unless the destinations are `scratch` (buffers
        the caller reads only after we return). Fails when no byte moves for `timeout_s`;
        `look(peers)` runs at least every LOOK_S and raises if ZeroMQ reports one of them
        lost, or an ABORT. (Trying each receive before the first wait was measured slower at
        tp 4.)"""
        unsent: dict[int, list[memoryview]] = {}
        for peer, header, payload in sends:
            views = [memoryview(header), payload]
            if not self._send(peer, views):  # most leave at once
                unsent[peer] = views
        unread = {peer: _Incoming(self.headers[peer], dest, expect, scratch)
                  for peer, dest, expect in recvs}
        for peer in unread:
            self._watch(peer, select.POLLIN | (select.POLLOUT if peer in unsent else 0))
        for peer in unsent.keys() - unread.keys():
            self._watch(peer, select.POLLOUT)
        self._pump(unread, unsent, look)

    def _pump(self, unread: dict[int, _Incoming], unsent: dict[int, list[memoryview]],
              look: Callable[[list[int]], None]) -> None:
        """Move bytes as the sockets allow until nothing is left to send or receive. A socket
        stays watched for reading after its message is in (the next one likely comes from
        the same peer); one that is ready when nothing is expected from it (the peer's next
        message is early, or it closed) is let go until it is."""
        now = time.monotonic()
        deadline, next_look = now + self.timeout_s, now + LOOK_S
        while unread or unsent:
            ready = self._poll(min(deadline, next_look) - now)
            for fd, events in ready:
                peer = self.peer_of[fd]
                if peer in unsent and events & ~select.POLLIN and self._send(peer, unsent[peer]):
                    del unsent[peer]
                    self._watch(peer, select.POLLIN if peer in unread else 0)
                if peer in unread:
                    if events & ~select.POLLOUT and self._recv(peer, unread[peer]):
                        del unread[peer]
                elif peer not in unsent:
                    self._watch(peer, 0)
            now = time.monotonic()
            if ready:
                deadline = now + self.timeout_s  # data moved
            if now >= next_look and (unread or unsent):
                look(sorted(unread.keys() | unsent.keys()))
                next_look = now + LOOK_S
            if now >= deadline and (unread or unsent):
                peers = sorted(unread.keys() | unsent.keys())
                who = ", ".join(f"rank {p}" for p in peers)
                raise MeshError(f"rank {self.me}: no data moved to or from {who} within "
                                f"{self.timeout_s:g}s", peers[0])

    def _watch(self, peer: int, mask: int) -> None:
        """Have the poller watch the peer's socket for `mask` (0: not at all)."""
        if self.masks[peer] != mask:
            if mask:
                self.poller.register(self.fds[peer], mask)
            else:
                self.poller.unregister(self.fds[peer])
            self.masks[peer] = mask

    def _poll(self, timeout_s: float) -> list[tuple[int, int]]:
        """The ready sockets: tried without blocking for up to `spin_s`, yielding the core
        between tries (the message is often microseconds away, and a rank asleep in poll costs
        its sender a wake-up), then waited for up to `timeout_s`."""
        ready = self.poller.poll(0)
        if not ready and self.spin_s:
            end = time.monotonic() + self.spin_s
            while not ready and time.monotonic() < end:
                _yield()
                ready = self.poller.poll(0)
        return ready or self.poller.poll(max(1, int(timeout_s * 1000)))

    def _send(self, peer: int, views: list[memoryview]) -> bool:
        try:
            n = self.socks[peer].sendmsg(views)
        except BlockingIOError:
            return False
        except OSError as e:
            raise self._lost(peer, e) from e
        return _advance(views, n)

    def _recv(self, peer: int, t: _Incoming) -> bool:
        """Receive what is there: the header until complete (then check it), and the payload
        straight into its destination."""
        sock = self.socks[peer]
        while t.views:
            try:
                n = sock.recvmsg_into(t.views)[0]
            except BlockingIOError:
                return False
            except OSError as e:
                raise self._lost(peer, e) from e
            if n == 0:
                raise self._lost(peer, None)
            _advance(t.views, n)
            if t.header_left:
                t.header_left = max(0, t.header_left - n)
                if not t.header_left:
                    self._check(peer, t)
                    if t.dest is not None and t.dest.nbytes:
                        t.views.append(t.dest)
        return True

    def _check(self, peer: int, t: _Incoming) -> None:
        if t.header != t.expect:
            got, want = (Header._make(HEADER.unpack(h)) for h in (t.header, t.expect))
            raise MeshError(f"rank {self.me}: rank {peer} sent {got}, expected {want}", peer)

    def _lost(self, peer: int, error: OSError | None) -> ConnectionLost:
        why = "closed its data connection" if error is None or error.errno in (
            errno.ECONNRESET, errno.EPIPE) else f"data connection failed: {error}"
        return ConnectionLost(f"rank {self.me}: rank {peer} {why}", peer)

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
