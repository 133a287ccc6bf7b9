"""Opening the tcp data path (see tcp): each rank listens on a port it announces in its
HELLO; once the ZeroMQ handshake has formed the mesh, every rank connects to each lower rank's
port and introduces itself (magic, formation id, its rank), and accepts the higher ranks.

Accepting never waits on one connection: new connections and their introductions are polled
together, each connection with its own short deadline, so strangers (a port scanner, a health
check, a rank of an earlier formation) are turned away without delaying the real peers.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Sequence

from shard_svc.mesh.communicator import MeshError

INTRO = struct.Struct("<4sQH")  # magic, formation id, the connecting rank
MAGIC = b"CMDS"
OPEN_S = 10.0  # every peer is listening once the handshake is done: connecting is quick
INTRO_S = 0.5  # a connection must introduce itself this soon after it is accepted


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on `host` (an IP literal, or "" / "::" for every interface, IPv4 and
    IPv6 where the system has both) and `port` (0: one the kernel picks)."""
    if host in ("", "::") and socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                    backlog=64)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=64)


def open_streams(listener: socket.socket, addresses: Sequence[str], me: int, formation: int,
                 deadline: float) -> dict[int, socket.socket]:
    """{peer: connected socket} for every other rank, within OPEN_S (and `deadline`)."""
    deadline = min(deadline, time.monotonic() + OPEN_S)
    socks: dict[int, socket.socket] = {}
    try:
        for peer in range(me):
            socks[peer] = _connect(addresses[peer], peer, me, formation, deadline)
        socks.update(_accept(listener, set(range(me + 1, len(addresses))), me, formation,
                             deadline))
    except BaseException:
        for s in socks.values():
            s.close()
        raise
    return socks


def _connect(address: str, peer: int, me: int, formation: int, deadline: float) -> socket.socket:
    """Connect to `peer`'s data listener (retrying while it is not up yet) and introduce us."""
    host, _, port = address.rpartition(":")
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            s = socket.create_connection((host.strip("[]"), int(port)),
                                         timeout=max(0.05, deadline - time.monotonic()))
        except OSError as e:
            last = e
            time.sleep(0.02)
            continue
        try:
            s.sendall(INTRO.pack(MAGIC, formation, me))
            return s
        except OSError as e:
            s.close()
            last = e
    raise MeshError(f"rank {me}: cannot open the data connection to rank {peer} at {address} "
                    f"(the port it announced; transport tcp needs every rank to reach every "
                    f"other there, transport zmq keeps the data on the mesh port): {last}", peer)


def _accept(listener: socket.socket, wanted: set[int], me: int, formation: int,
            deadline: float) -> dict[int, socket.socket]:
    """Accept until every rank in `wanted` has introduced itself for this formation."""
    got: dict[int, socket.socket] = {}
    waiting: dict[int, tuple[socket.socket, bytearray, float]] = {}  # fd: (conn, intro, until)
    listener.setblocking(False)
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    try:
        while wanted - set(got):
            now = time.monotonic()
            if now >= deadline:
                missing = sorted(wanted - set(got))
                raise MeshError(f"rank {me}: no data connection from rank(s) {missing} "
                                f"within {OPEN_S:g}s of forming", missing[0])
            for fd, (conn, _, until) in list(waiting.items()):
                if now >= until:  # silent: a stranger
                    poller.unregister(fd)
                    conn.close()
                    del waiting[fd]
            until = min([deadline, *(w[2] for w in waiting.values())])
            for fd, _ in poller.poll(max(1, int((until - now) * 1000))):
                if fd == listener.fileno():
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, ConnectionAbortedError):
                        continue
                    except OSError as e:
                        raise MeshError(f"rank {me}: accepting data connections failed: {e}"
                                        ) from e
                    conn.setblocking(False)
                    waiting[conn.fileno()] = (conn, bytearray(), time.monotonic() + INTRO_S)
                    poller.register(conn, select.POLLIN)
                    continue
                conn, intro, _ = waiting[fd]
                rank = _read_intro(conn, intro, formation, wanted - set(got))
                if rank is not None or len(intro) >= INTRO.size or not _alive(conn):
                    poller.unregister(fd)
                    del waiting[fd]
                    if rank is None:
                        conn.close()  # a stranger, or a rank of another formation
                    else:
                        got[rank] = conn
    except BaseException:
        for s in got.values():
            s.close()
        raise
    finally:
        for conn, _, _ in waiting.values():
            conn.close()
    return got


def _read_intro(conn: socket.socket, intro: bytearray, formation: int,
                wanted: set[int]) -> int | None:
    """Read what is there of the introduction; the rank once it is complete and valid."""
    try:
        intro += conn.recv(INTRO.size - len(intro))
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        intro += b"\0" * (INTRO.size - len(intro))  # failed: treat as complete and invalid
        return None
    if len(intro) < INTRO.size:
        return None
    magic, fid, rank = INTRO.unpack(intro)
    return rank if magic == MAGIC and fid == formation and rank in wanted else None


def _alive(conn: socket.socket) -> bool:
    """False once the peer has closed (a readable socket with nothing to read)."""
    try:
        return bool(conn.recv(1, socket.MSG_PEEK))
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
