"""The tcp data path: one plain TCP connection per pair of ranks, carrying only DATA.

ZeroMQ moves every message through its I/O thread: the sender's thread hands it over, the I/O
thread writes the socket, the peer's I/O thread reads it and wakes the peer's thread. On loopback
that costs ~50 µs per exchange of 2 KiB; a kernel socket written and read by the ranks' own
threads costs ~10 µs. So, once the ZeroMQ handshake has formed the mesh, each pair of ranks opens
a TCP connection (the higher rank connects to the address the lower rank announced in its HELLO,
and introduces itself with the formation id and its rank). Everything else — handshake,
heartbeats, ABORT, BYE, and the detection of a hung peer — stays on ZeroMQ.

Each DATA message is the 32-byte mesh header (mesh_wire) followed by the tensor bytes, sent
straight from the tensor's memory with one `sendmsg` and received straight into its destination.
Per pair the stream is ordered and belongs to one formation, so the next message from a peer is
always the one expected; anything else is a broken mesh. A peer that dies closes its connection
(an error at once); one that hangs is caught by ZeroMQ's heartbeats, looked at between waits.
The bytes travel unencrypted: with CURVE the data stays on ZeroMQ (transport zmq).
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shard_svc.mesh import MeshError
from shard_svc.mesh_wire import HEADER, Header, Kind

INTRO = struct.Struct("<4sQH")  # magic, formation id, the connecting rank
MAGIC = b"CMDS"
LOOK_S = 0.05  # longest wait on the sockets between two looks at ZeroMQ (events, ABORT)
OPEN_S = 10.0  # every peer is listening once the handshake is done: connecting is quick


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on `host` (an IP literal, or "" for every interface) and `port`
    (0: one the kernel picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if host == "" and socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                    backlog=64)
    return socket.create_server((host, port), family=family, backlog=64)


def _address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class _Transfer:
    peer: int
    views: list[memoryview]  # what is left to send, or to receive into (header first)
    header: bytearray | None = None  # receives: the header's buffer
    done: int = 0  # receives: bytes received so far
    expect: tuple[int, ...] = field(default_factory=tuple)  # receives: the header's fields


class Streams:
    def __init__(self, socks: dict[int, socket.socket], me: int, formation: int,
                 timeout_s: float) -> None:
        self.socks, self.me, self.formation, self.timeout_s = socks, me, formation, timeout_s
        self.poller = select.poll()

    @classmethod
    def open(cls, listener: socket.socket, addresses: Sequence[str], me: int, formation: int,
             deadline: float, timeout_s: float) -> Streams:
        """Connect to every lower rank, accept every higher one (checking its introduction)."""
        deadline = min(deadline, time.monotonic() + OPEN_S)
        socks: dict[int, socket.socket] = {}
        try:
            for peer in range(me):
                socks[peer] = _connect(addresses[peer], peer, me, formation, deadline)
            wanted = set(range(me + 1, len(addresses)))
            while wanted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MeshError(f"rank {me}: no data connection from rank(s) "
                                    f"{sorted(wanted)} before the deadline", min(wanted))
                listener.settimeout(remaining)
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                claimed = _introduction(conn, formation, wanted, deadline)
                if claimed is None:
                    conn.close()  # a stranger, or a connection meant for another formation
                else:
                    socks[claimed] = conn
                    wanted.discard(claimed)
        except BaseException:
            for s in socks.values():
                s.close()
            raise
        for s in socks.values():
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(socks, me, formation, timeout_s)

    def exchange(self, sends: Sequence[tuple[int, bytes, memoryview]],
                 recvs: Sequence[tuple[int, memoryview, tuple[int, ...]]],
                 look: Callable[[list[int]], None]) -> None:
        """Send each (peer, header, payload) and receive each (peer, destination, expected
        header fields dtype, step, algo, seq, numel, nbytes) concurrently, within `timeout_s`;
        `look(peers)` runs between waits and raises if ZeroMQ reports one of them lost, or an
        ABORT. (Trying each receive before the first wait was measured slower at tp 4.)"""
        pending = [_Transfer(p, [memoryview(h), payload]) for p, h, payload in sends]
        pending = [t for t in pending if not self._send(t)]  # most leave at once
        for peer, dest, expect in recvs:
            header = bytearray(HEADER.size)
            pending.append(_Transfer(peer, [memoryview(header), dest], header, 0, expect))
        deadline = time.monotonic() + self.timeout_s
        while pending:
            masks: dict[int, int] = {}
            for t in pending:
                fd = self.socks[t.peer].fileno()
                masks[fd] = masks.get(fd, 0) | (select.POLLIN if t.header is not None
                                                else select.POLLOUT)
            for fd, mask in masks.items():
                self.poller.register(fd, mask)
            now = time.monotonic()
            if now >= deadline:
                peers = sorted({t.peer for t in pending})
                who = ", ".join(f"rank {p}" for p in peers)
                raise MeshError(f"rank {self.me}: no data moved to or from {who} within "
                                f"{self.timeout_s:g}s", peers[0])
            ready = self.poller.poll(max(1, int(min(LOOK_S, deadline - now) * 1000)))
            for fd in masks:
                self.poller.unregister(fd)
            if not ready:
                look(sorted({t.peer for t in pending}))
                continue
            flags = dict(ready)
            still = []
            for t in pending:
                if self.socks[t.peer].fileno() in flags and (
                        self._send(t) if t.header is None else self._recv(t)):
                    continue
                still.append(t)
            pending = still

    def _send(self, t: _Transfer) -> bool:
        try:
            n = self.socks[t.peer].sendmsg(t.views)
        except BlockingIOError:
            return False
        except OSError as e:
            raise self._lost(t.peer, e) from e
        return _advance(t.views, n)

    def _recv(self, t: _Transfer) -> bool:
        try:
            n = self.socks[t.peer].recvmsg_into(t.views)[0]
        except BlockingIOError:
            return False
        except OSError as e:
            raise self._lost(t.peer, e) from e
        if n == 0:
            raise self._lost(t.peer, None)
        before, t.done = t.done, t.done + n
        if before < HEADER.size <= t.done:
            self._check(t)
        return _advance(t.views, n)

    def _check(self, t: _Transfer) -> None:
        assert t.header is not None
        got = Header._make(HEADER.unpack(t.header))
        want = (Kind.DATA, t.peer, self.formation, *t.expect)
        if (got.kind, got.sender, got.formation, got.dtype, got.step, got.algo, got.seq,
                got.numel, got.nbytes) != want:
            raise MeshError(f"rank {self.me}: rank {t.peer} sent {got}, expected kind, sender, "
                            f"formation, dtype, step, algo, seq, numel, nbytes = {want}", t.peer)

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


def _connect(address: str, peer: int, me: int, formation: int, deadline: float) -> socket.socket:
    """Connect to `peer`'s data listener (retrying while it is not up yet) and introduce us."""
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            s = socket.create_connection(_address(address),
                                         timeout=max(0.05, deadline - time.monotonic()))
        except OSError as e:
            last = e
            time.sleep(0.02)
            continue
        s.sendall(INTRO.pack(MAGIC, formation, me))
        return s
    raise MeshError(f"rank {me}: cannot open the data connection to rank {peer} at {address} "
                    f"(the port it announced; transport tcp needs every rank to reach every "
                    f"other there, transport zmq keeps the data on the mesh port): {last}", peer)


def _introduction(conn: socket.socket, formation: int, wanted: set[int],
                  deadline: float) -> int | None:
    """The rank a new connection introduces, if it belongs to this formation and is wanted."""
    conn.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
    data = b""
    try:
        while len(data) < INTRO.size:
            chunk = conn.recv(INTRO.size - len(data))
            if not chunk:
                return None
            data += chunk
    except OSError:
        return None
    magic, fid, rank = INTRO.unpack(data)
    return rank if magic == MAGIC and fid == formation and rank in wanted else None
