"""MeshConfig: everything one rank needs to join a ZeroMQ allreduce mesh, validated once."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

TRANSPORTS = ("auto", "tcp", "zmq", "ipc", "shm")
ALGORITHMS = ("auto", "direct", "scatter", "ring")
MAX_TP_SIZE = 16


@dataclass(frozen=True)
class MeshConfig:
    tp_rank: int
    tp_size: int
    peers: tuple[str, ...]  # "host:port" of every rank, by tp_rank (ours too)
    fingerprint: str = ""  # of the model and plan; every rank must present the same one
    mesh_name: str = "cpumesh"
    listen: str | None = None  # bind "host:port"; default: from our peers entry (bind_endpoint)
    # Data transport; control (handshake, heartbeats, ABORT, BYE) always uses ZeroMQ.
    # tcp: a plain TCP connection per pair of ranks (tcp; unencrypted, so not with CURVE).
    # zmq: the ZeroMQ tcp sockets (CURVE-encrypted when CURVE is on).
    # ipc: ZeroMQ ipc:// endpoints in ipc_dir (all ranks on one host).
    # shm: shared memory (all ranks on one host). auto: shm when every rank reports the same
    # host, else tcp, or zmq with CURVE.
    transport: str = "auto"
    stream_port: int = 0  # tcp: where our data listener binds (0: a port the kernel picks)
    stream_spin_s: float = 50e-6  # tcp: poll without sleeping this long (yielding) per wait
    # auto: direct below ring_min_bytes, else scatter; on shm: direct below shm_ring_min_bytes,
    # else its ring (see algorithms, shm)
    algorithm: str = "auto"
    ring_min_bytes: int = 1024 * 1024  # tcp/ipc; placed with bench/allreduce.py --algorithms
    shm_ring_min_bytes: int = 256 * 1024  # likewise
    form_timeout_s: float = 120.0  # forming the mesh (all peers answered and agreed)
    recv_timeout_s: float = 30.0  # longest wait for any one peer's message inside a collective
    hello_interval_s: float = 0.2  # handshake resend period
    close_timeout_s: float = 2.0  # close() waits this long for every peer's BYE
    heartbeat_interval_s: float = 0.2  # ZeroMQ ZMTP heartbeats on every connection
    heartbeat_timeout_s: float = 1.0  # a peer silent this long is disconnected (dead or hung)
    curve_secret_key: Path | None = None  # our key pair, zmq.auth format (rank-R.key_secret)
    curve_public_keys: Path | None = None  # directory of every rank's public key: rank-R.key
    ipc_dir: Path = Path("/tmp")
    shm_dir: Path = Path("/dev/shm")
    shm_slot_bytes: int = 8 * 1024 * 1024  # larger tensors are reduced in pieces of this size
    shm_spin_s: float = 0.0  # busy-wait this long, then yield (a co-scheduled peer needs the CPU)
    shm_yield_s: float = 2e-3  # then sleep between checks

    def __post_init__(self) -> None:
        if not 1 <= self.tp_size <= MAX_TP_SIZE:
            raise ValueError(f"tp_size must be in 1..{MAX_TP_SIZE}, got {self.tp_size}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in 0..{self.tp_size - 1}, got {self.tp_rank}")
        if len(self.peers) != self.tp_size:
            raise ValueError(f"peers lists {len(self.peers)} addresses, tp_size is {self.tp_size}")
        for peer in (*self.peers, *([self.listen] if self.listen else [])):
            host, _, port = peer.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"peer address {peer!r} is not host:port")
        if len(set(self.peers)) != len(self.peers):
            raise ValueError(f"peers lists an address twice: {self.peers}")
        if not self.mesh_name or not self.mesh_name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"mesh_name must be letters, digits, - or _, got {self.mesh_name!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        for name in ("ring_min_bytes", "shm_ring_min_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.shm_slot_bytes < 4096 or self.shm_slot_bytes % 64:
            raise ValueError(
                f"shm_slot_bytes must be a multiple of 64 and >= 4096, got {self.shm_slot_bytes}")
        for name in ("form_timeout_s", "recv_timeout_s", "hello_interval_s", "close_timeout_s",
                     "heartbeat_interval_s", "heartbeat_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("shm_spin_s", "shm_yield_s", "stream_spin_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.heartbeat_timeout_s < self.heartbeat_interval_s:
            raise ValueError(f"heartbeat_timeout_s {self.heartbeat_timeout_s} is shorter than "
                             f"heartbeat_interval_s {self.heartbeat_interval_s}")
        curve = (self.curve_secret_key, self.curve_public_keys)
        if any(curve) and not all(curve):
            raise ValueError("CURVE needs both curve_secret_key and curve_public_keys")
        if self.curve and self.transport == "tcp":
            raise ValueError("transport 'tcp' sends tensors unencrypted outside ZeroMQ; with "
                             "CURVE use 'zmq' (or 'auto')")
        if not 0 <= self.stream_port < 65536:
            raise ValueError(f"stream_port must be in 0..65535, got {self.stream_port}")

    @property
    def curve(self) -> bool:
        return self.curve_secret_key is not None

    @property
    def ipv6(self) -> bool:
        """Whether any mesh address is an IPv6 literal ("[::1]:5555")."""
        return any(a.startswith("[") for a in (*self.peers, self.listen or ""))

    @property
    def offers_streams(self) -> bool:
        """Whether this rank opens a tcp data listener (used when no shared memory is)."""
        return self.transport == "tcp" or (self.transport == "auto" and not self.curve)

    def stream_bind_host(self) -> str:
        """The IP literal our data listener binds ("" for every interface), as bind_endpoint."""
        host = self.bind_endpoint().removeprefix("tcp://").rpartition(":")[0]
        return "" if host == "*" else host.strip("[]")

    def stream_address(self, port: int) -> str:
        """How peers reach our data listener: our peers entry's host, with its port."""
        return f"{self.peers[self.tp_rank].rpartition(':')[0]}:{port}"

    def bind_endpoint(self) -> str:
        """Where we listen. tcp: `listen`, else our peers entry when its host is an IP, else all
        interfaces on its port (a DNS name such as a StatefulSet pod's cannot be bound)."""
        if self.transport == "ipc":
            return self.peer_endpoint(self.tp_rank)
        if self.listen:
            return f"tcp://{self.listen}"
        host, _, port = self.peers[self.tp_rank].rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return f"tcp://*:{port}"
        return f"tcp://{host}:{port}"

    def peer_endpoint(self, tp_rank: int) -> str:
        """The ZeroMQ endpoint at which rank `tp_rank` listens."""
        return self.endpoint(self.peers[tp_rank])

    def endpoint(self, address: str) -> str:
        """The ZeroMQ endpoint for a "host:port" mesh address."""
        if self.transport == "ipc":
            host, _, port = address.rpartition(":")
            return f"ipc://{self.ipc_dir}/{self.mesh_name}-{host.replace('/', '_')}-{port}.sock"
        return f"tcp://{address}"
