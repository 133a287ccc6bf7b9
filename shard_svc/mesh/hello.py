"""HELLO: who a rank says it is, and whether we believe it.

A HELLO carries the mesh's settings (name, world size, fingerprint, algorithm settings, wire
version), the sender's rank, a fresh nonce, its host and shared-memory segment and its own
address. `refusal` is the one judgement of a HELLO, made both while forming (handshake.py: a
refused peer is told why) and in a formed mesh (inbox.py: only a HELLO that would be accepted
may end the formation; anything else is a stranger's, ignored, so that someone who can reach
a mesh port, or a shard of another group pointed at it, cannot break a formed group).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from shard_svc.mesh.config import MeshConfig
from shard_svc.mesh.wire import WIRE_VERSION


@dataclass(frozen=True)
class Hello:
    rank: int
    nonce: str
    host: str
    pid: int
    host_id: str  # equal on ranks that can share memory
    shm: str | None  # path of the rank's shared-memory segment
    address: str = ""  # its own entry in its peers list
    stream: str = ""  # "host:port" of its tcp data listener ("" when it offers none)


def settings(config: MeshConfig) -> dict[str, object]:
    """What must be equal on all ranks besides the fingerprint."""
    return {"v": WIRE_VERSION, "mesh": config.mesh_name, "size": config.tp_size,
            "fingerprint": config.fingerprint, "algorithm": config.algorithm,
            "ring_min_bytes": config.ring_min_bytes,
            "shm_ring_min_bytes": config.shm_ring_min_bytes,
            "shm_slot_bytes": config.shm_slot_bytes, "transport": config.transport}


def local_hello(nonce: str, shm: str | None, shm_dir: str, stream: str = "") -> Hello:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        st = os.stat(shm_dir)
        host_id = f"{boot}/{st.st_dev}/{st.st_ino}"
    except OSError:
        host_id = f"{socket.gethostname()}/{os.getpid()}"  # unique: never shares memory
    return Hello(-1, nonce, socket.gethostname(), os.getpid(), host_id, shm, stream=stream)


def parse_hello(body: dict[str, object]) -> Hello | None:
    """The Hello in a HELLO's body, or None when fields are missing or mistyped."""
    try:
        h = Hello(**{k: body[k] for k in Hello.__dataclass_fields__})  # type: ignore[arg-type]
    except (KeyError, TypeError):
        return None
    if not isinstance(h.rank, int) or not isinstance(h.nonce, str):
        return None
    return h


def refusal(config: MeshConfig, ours: dict[str, object], h: Hello, body: dict[str, object],
            user: str | None, keys: dict[str, int], me: Hello | None = None) -> str | None:
    """Why this HELLO is refused, or None. `ours`: our `settings`; `user`: the CURVE User-Id
    it came with (None without CURVE); `keys`: every rank's public key (z85) to its rank; `me`:
    our own Hello, named when someone claims our rank."""
    for key, value in ours.items():
        if body.get(key) != value:
            return f"rank {h.rank} (pid {h.pid} on {h.host}) has {key} {body.get(key)!r}, " \
                   f"ours is {value!r}"
    if h.rank == config.tp_rank:
        we = f" (we are pid {me.pid} on {me.host})" if me is not None else ""
        return f"duplicate rank {h.rank}: pid {h.pid} on {h.host} claims our own rank{we}"
    if not 0 <= h.rank < config.tp_size:
        return f"a peer (pid {h.pid} on {h.host}) claims rank {h.rank}, outside the mesh"
    if h.address != config.peers[h.rank]:
        return (f"duplicate rank {h.rank}: pid {h.pid} on {h.host} claims it at "
                f"{h.address}, our peers list has rank {h.rank} at {config.peers[h.rank]}")
    if config.curve and keys.get(user or "") != h.rank:
        return (f"rank {h.rank} (pid {h.pid} on {h.host}) presented the CURVE key of "
                f"rank {keys.get(user or '')}")
    return None
