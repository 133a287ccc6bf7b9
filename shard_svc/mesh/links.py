"""ZeroMQ links of one rank: a PULL socket we listen on, a PUSH socket to each peer, and a monitor
on each PUSH so that a dead or hung peer (ZMTP heartbeats) wakes any wait at once.

Every message to us arrives on the one PULL socket, each peer's in the order it sent them; every
message from us to peer j leaves on PUSH j. Sends never block (a full queue is an error); receives
always wait with a timeout, inside `wait`, which also reports peer events.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from shard_svc.mesh.communicator import MeshError
from shard_svc.mesh.config import MeshConfig

LOST: dict[int, str] = {
    zmq.EVENT_DISCONNECTED: "disconnected (dead, or silent past the heartbeat timeout)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused our CURVE key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed the ZeroMQ handshake",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed the ZeroMQ handshake"}
PUSH_EVENTS = functools.reduce(operator.or_, LOST)  # every event that loses a peer
ZERO_COPY_MIN_BYTES = 512 * 1024  # smaller payloads are copied (see send_data)
PULL_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


@dataclass(frozen=True)
class PeerEvent:
    peer: int | None  # None: a connection to our PULL socket, sender unknown
    event: int

    @property
    def lost(self) -> bool:
        return self.event in LOST

    def describe(self) -> str:
        who = f"rank {self.peer}" if self.peer is not None else "an unknown peer"
        if self.peer is None and self.event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return "a peer with an unknown CURVE key was refused"
        return f"{who} {LOST.get(self.event) or zmq.Event(self.event).name}"


def curve_keys(directory: Path, tp_size: int) -> dict[int, bytes]:
    """Every rank's public key (z85) from rank-R.key files in `directory`."""
    keys = {}
    for rank in range(tp_size):
        path = directory / f"rank-{rank}.key"
        if not path.is_file():
            raise ValueError(f"no CURVE public key for rank {rank}: {path} is missing")
        public, _ = zmq.auth.load_certificate(path)
        keys[rank] = public
    return keys


class Links:
    def __init__(self, config: MeshConfig, context: zmq.Context) -> None:
        self.config = config
        self.ctx = context
        self.me = config.tp_rank
        self.others = [r for r in range(config.tp_size) if r != self.me]
        self.auth: ThreadAuthenticator | None = None
        self.public_keys: dict[int, bytes] = {}
        self.keypair: tuple[bytes, bytes] = (b"", b"")
        self.pull: zmq.Socket | None = None
        self._rcvtimeo = -1
        self.push: dict[int, zmq.Socket] = {}
        self.monitors: dict[int, zmq.Socket] = {}
        self.pull_monitor: zmq.Socket | None = None
        self.poller = zmq.Poller()

    def open(self, deadline: float) -> None:
        cfg = self.config
        secret = public = None
        if cfg.curve:
            assert cfg.curve_secret_key is not None and cfg.curve_public_keys is not None
            self.public_keys = curve_keys(cfg.curve_public_keys, cfg.tp_size)
            public, secret = zmq.auth.load_certificate(cfg.curve_secret_key)
            if not secret:
                raise ValueError(f"{cfg.curve_secret_key} holds no CURVE secret key")
            self.keypair = (public, secret)
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=str(cfg.curve_public_keys))
        self.pull = self._socket(zmq.PULL)
        if secret:
            self.pull.curve_server = True
            self.pull.curve_publickey, self.pull.curve_secretkey = public, secret
        self.pull_monitor = self.pull.get_monitor_socket(PULL_EVENTS)
        self._bind(deadline)
        self.poller.register(self.pull, zmq.POLLIN)
        self.poller.register(self.pull_monitor, zmq.POLLIN)
        for peer in self.others:
            sock = self._socket(zmq.PUSH)
            if secret:
                sock.curve_publickey, sock.curve_secretkey = public, secret
                sock.curve_serverkey = self.public_keys[peer]
            self.monitors[peer] = sock.get_monitor_socket(PUSH_EVENTS)
            self.poller.register(self.monitors[peer], zmq.POLLIN)
            sock.connect(cfg.peer_endpoint(peer))
            self.push[peer] = sock

    def _socket(self, kind: int) -> zmq.Socket:
        cfg = self.config
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = 0  # collectives bound the queues; never drop, never block
        sock.heartbeat_ivl = int(cfg.heartbeat_interval_s * 1000)
        sock.heartbeat_timeout = int(cfg.heartbeat_timeout_s * 1000)
        sock.heartbeat_ttl = max(100, int(cfg.heartbeat_timeout_s * 1000) // 100 * 100)
        sock.reconnect_ivl = 100
        sock.copy_threshold = ZERO_COPY_MIN_BYTES  # pyzmq's own switch to zero copy
        sock.ipv6 = cfg.ipv6
        return sock

    def _bind(self, deadline: float) -> None:
        """Bind, retrying while the port is still held by our previous formation's socket."""
        assert self.pull is not None
        endpoint = self.config.bind_endpoint()
        while True:
            try:
                self.pull.bind(endpoint)
                return
            except zmq.ZMQError as e:
                if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise MeshError(f"rank {self.me} cannot listen on {endpoint}: {e}") from e
                time.sleep(0.05)

    def send(self, peer: int, frames: list[bytes]) -> None:
        """Send a small control message; dropped silently if it cannot be queued."""
        with contextlib.suppress(zmq.ZMQError):
            self.push[peer].send_multipart(frames, zmq.NOBLOCK)

    def send_to(self, address: str, frames: list[bytes], server_key: bytes | None) -> None:
        """Send one message to an address outside our peers list (a refused claimant)."""
        sock = self.ctx.socket(zmq.PUSH)
        sock.linger = 1000
        if self.config.curve:
            if server_key is None:
                sock.close(0)
                return
            sock.curve_publickey, sock.curve_secretkey = self.keypair
            sock.curve_serverkey = server_key
        with contextlib.suppress(zmq.ZMQError):
            sock.connect(self.config.endpoint(address))
            sock.send_multipart(frames, zmq.NOBLOCK)
        sock.close()

    def send_data(self, peer: int, header: bytes, payload: memoryview
                  ) -> zmq.MessageTracker | None:
        """Queue header + tensor bytes. From ZERO_COPY_MIN_BYTES up without copying them: the
        returned tracker says when libzmq is done with the memory. Below it one memcpy into the
        message is cheaper than tracking (which wakes pyzmq's collector thread for every
        message), and nothing is returned."""
        sock = self.push[peer]
        try:
            sock.send(header, zmq.SNDMORE | zmq.NOBLOCK)
            if payload.nbytes < ZERO_COPY_MIN_BYTES:
                sock.send(payload, zmq.NOBLOCK)
                return None
            return sock.send(payload, zmq.NOBLOCK, copy=False, track=True)
        except zmq.ZMQError as e:
            raise MeshError(f"rank {self.me} cannot send to rank {peer}: {e}", peer) from e

    def recv_header(self, timeout_s: float = 0.0) -> bytes | None:
        """The first frame of the next message, or None when none came within `timeout_s`.
        A blocking receive wakes ~20 µs sooner than a poll of the same socket with the monitors,
        so the wait inside a collective is this, in slices, with the monitors read in between."""
        assert self.pull is not None
        try:
            if timeout_s <= 0:
                return self.pull.recv(zmq.NOBLOCK)
            timeout_ms = max(1, int(timeout_s * 1000))
            if timeout_ms != self._rcvtimeo:
                self.pull.rcvtimeo = self._rcvtimeo = timeout_ms
            return self.pull.recv()
        except zmq.Again:
            return None

    def recv_into(self, buffer: memoryview) -> int:
        """The payload frame that follows a header, into `buffer`; returns its true size."""
        assert self.pull is not None
        return self.pull.recv_into(buffer)

    def recv_body(self) -> bytes:
        assert self.pull is not None
        return self.pull.recv()

    def recv_frame(self) -> zmq.Frame:
        """The payload frame as a zero-copy Frame (used where its metadata is needed)."""
        assert self.pull is not None
        return self.pull.recv(copy=False)

    def skip_rest(self) -> None:
        """Discard the remaining frames of the current message."""
        assert self.pull is not None
        while self.pull.getsockopt(zmq.RCVMORE):
            self.pull.recv_into(bytearray())

    def wait(self, timeout_s: float) -> list[PeerEvent]:
        """Wait until a message is waiting or a peer event happened (or the timeout); return the
        peer events (a message, if any, is left on the PULL socket)."""
        ready = self.poller.poll(max(0, int(timeout_s * 1000 + 0.999)))
        if len(ready) == 1 and ready[0][0] is self.pull:
            return []  # the common case: a message, no monitor to drain
        return self.events()

    def events(self) -> list[PeerEvent]:
        """Drain the monitors without waiting."""
        events = []
        for peer, mon in self.monitors.items():
            while mon.poll(0):
                event = recv_monitor_message(mon)["event"]
                events.append(PeerEvent(peer, event))
        while self.pull_monitor is not None and self.pull_monitor.poll(0):
            events.append(PeerEvent(None, recv_monitor_message(
                self.pull_monitor)["event"]))
        return events

    def close(self, linger_s: float = 0.0) -> None:
        """Close every socket; `linger_s` lets queued messages (a BYE) leave first."""
        for peer, sock in self.push.items():
            sock.disable_monitor()
            self.monitors[peer].close(0)
            sock.close(int(linger_s * 1000))
        if self.pull is not None:
            self.pull.disable_monitor()
            if self.pull_monitor is not None:
                self.pull_monitor.close(0)
            self.pull.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.push, self.monitors, self.pull, self.pull_monitor, self.auth = {}, {}, None, None, None


def create_curve_keys(directory: Path, tp_size: int) -> list[tuple[Path, Path]]:
    """Write a CURVE key pair per rank into `directory` (rank-R.key public, rank-R.key_secret);
    returns [(public, secret)] by rank. The directory then serves as `curve_public_keys`."""
    directory.mkdir(parents=True, exist_ok=True)
    pairs = []
    for rank in range(tp_size):
        public, secret = zmq.auth.create_certificates(str(directory), f"rank-{rank}")
        pairs.append((Path(public), Path(secret)))
    return pairs
