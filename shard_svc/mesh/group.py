"""MeshGroup: one tensor-parallel group's allreduce mesh between shard processes: control over
ZeroMQ, data over shared memory (one host), plain TCP, or ZeroMQ (with CURVE).

Words as in the package glossary (shard_svc/mesh/__init__.py).

Lifecycle: `MeshGroup(config)` forms the mesh (binds, connects, handshakes; `MeshError` after
`form_timeout_s` listing who never answered or was refused). `all_reduce` sums in place. Any
failure (a peer died, hung past the heartbeat timeout, restarted, aborted, or sent nonsense)
raises `MeshError` naming the peer, tells the other ranks (ABORT), and leaves the mesh broken:
every later `all_reduce` raises at once until `reform()` succeeds; the tensor that was being
reduced then holds undefined values. The peers learn who failed from the ABORT, not from
the aborting rank's sockets closing as it re-forms (see ABORT_LINGER_S, ABORT_GRACE_S). Between
collectives `watch()` notices the same failures
without waiting (and a peer forming a new mesh: its HELLO carries a new nonce). `close()` says
BYE.

Data paths: shared memory (shm.py), else message passing (passing.py: ZeroMQ or tcp streams).
Summation order (algorithms): direct, scatter and shm give `sum_in_rank_order` bit for bit. The
message-passing ring sums chunk c as ((p[c+1] + p[c+2]) + …) + p[c], the same on every rank
because only its owner computes it. bfloat16 is accumulated in float32 and rounded once.
"""

from __future__ import annotations

import secrets
import threading
import time
from types import TracebackType

import torch
import zmq

from shard_svc.mesh.communicator import ConnectionLost, MeshError
from shard_svc.mesh.config import MeshConfig
from shard_svc.mesh.handshake import Formation, Handshake
from shard_svc.mesh.hello import Hello, local_hello
from shard_svc.mesh.inbox import Inbox
from shard_svc.mesh.links import Links, create_curve_keys
from shard_svc.mesh.passing import MessagePassing
from shard_svc.mesh.shm import SharedSlots, stores_are_ordered
from shard_svc.mesh.tcp import Streams
from shard_svc.mesh.tcp_open import listen
from shard_svc.mesh.wire import DTYPE_CODES, Kind, control

__all__ = ["MeshConfig", "MeshError", "MeshGroup", "create_curve_keys"]

# A rank re-forming after a failure closes its sockets; its ABORT may still be queued in ZeroMQ
# and is given this long to leave (closing without linger dropped it: the peers then blamed us).
ABORT_LINGER_S = 0.5
# A peer's data connection closed: how long to wait for the ABORT that may explain it (a rank
# that aborts tears its mesh down, and the close can overtake its ABORT) before blaming the peer.
ABORT_GRACE_S = 0.25


class MeshGroup:
    def __init__(self, config: MeshConfig, *, form: bool = True) -> None:
        self.config = config
        self._ctx: zmq.Context | None = None
        self._links: Links | None = None
        self._shm: SharedSlots | None = None
        self._streams: Streams | None = None
        self._passing: MessagePassing | None = None  # the data path without shared memory
        self._inbox: Inbox | None = None
        self._formation: Formation | None = None
        self._seq = 0
        self._broken: MeshError | None = MeshError("the mesh has not been formed")
        self._interrupted = threading.Event()
        if form:
            self.form()

    @property
    def tp_rank(self) -> int:
        return self.config.tp_rank

    @property
    def tp_size(self) -> int:
        return self.config.tp_size

    @property
    def transport(self) -> str:
        """The data path in use: "shm", "tcp", "zmq" or "ipc" ("none" at tp_size 1)."""
        if self.tp_size == 1:
            return "none"
        if self._formation is not None and self._formation.shm:
            return "shm"
        if self._streams is not None:
            return "tcp"
        return "ipc" if self.config.transport == "ipc" else "zmq"

    @property
    def formed(self) -> bool:
        return self._broken is None

    @property
    def broken(self) -> MeshError | None:
        """Why the mesh is not formed (None while it is)."""
        return self._broken

    @property
    def formation(self) -> int | None:
        """The current formation's id; None while the mesh is broken (0 at tp_size 1)."""
        if self.tp_size == 1:
            return 0
        return self._formation.formation if self._broken is None and self._formation else None

    def form(self, timeout_s: float | None = None) -> None:
        """(Re)form the mesh with fresh sockets; blocks until every peer agreed or the deadline."""
        self._teardown(linger_s=ABORT_LINGER_S)  # an ABORT we sent still leaves
        if self.tp_size == 1:
            self._broken = None
            return
        cfg = self.config
        limit_s = cfg.form_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit_s
        self._ctx = self._ctx or zmq.Context()
        nonce = secrets.token_hex(8)
        listener = None
        try:
            if cfg.transport in ("auto", "shm") and cfg.shm_dir.is_dir() \
                    and stores_are_ordered():
                self._shm = SharedSlots(cfg, nonce)
            stream = ""
            if cfg.offers_streams:
                listener = listen(cfg.stream_bind_host(), cfg.stream_port)
                stream = cfg.stream_address(listener.getsockname()[1])
            self._links = Links(cfg, self._ctx)
            self._links.open(deadline)
            me = local_hello(nonce, str(self._shm.path) if self._shm else None, str(cfg.shm_dir),
                             stream)
            handshake = Handshake(cfg, self._links, me, self._map_shm, limit_s)
            self._formation = handshake.run(deadline, self._interrupted.is_set)
            if self._formation.streams:
                assert listener is not None
                self._streams = Streams.open(
                    listener, [h.stream for h in self._formation.hellos], cfg.tp_rank,
                    self._formation.formation, deadline, cfg.recv_timeout_s,
                    cfg.stream_spin_s)
        except BaseException:
            self._teardown()
            raise
        finally:
            if listener is not None:
                listener.close()
        if self._shm is not None:
            self._shm.unlink()  # every peer has mapped it (or given up on shared memory)
            if not self._formation.shm:
                self._shm.close()
                self._shm = None
        self._inbox = Inbox(self._links, self._formation, cfg.recv_timeout_s, handshake.early)
        if self._shm is None:
            self._passing = MessagePassing(cfg, self._links, self._inbox,
                                           self._formation.formation, self._streams)
        self._seq = 0
        self._broken = None

    reform = form

    def _map_shm(self, hellos: list[Hello]) -> bool:
        return self._shm is not None and self._shm.map_peers([h.shm for h in hellos])

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all ranks in place and return it (see the module docstring)."""
        if tensor.dtype not in DTYPE_CODES:
            raise ValueError(f"all_reduce supports float32 and bfloat16, got {tensor.dtype}")
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("all_reduce needs a contiguous CPU tensor")
        if self.tp_size == 1:
            return tensor
        if self._broken is not None:
            raise MeshError(f"mesh is broken ({self._broken}); reform() it first",
                            self._broken.peer)
        flat = (tensor.detach() if tensor.requires_grad else tensor).view(-1)
        nbytes = flat.numel() * flat.element_size()
        try:
            assert self._inbox is not None
            self._inbox.start(self._seq)
            if self._shm is not None:
                use_ring = self._use_ring(nbytes, self.config.shm_ring_min_bytes)
                self._seq += self._shm.all_reduce(flat, self._seq, use_ring, self._inbox.service)
            else:
                assert self._passing is not None
                self._passing.all_reduce(flat, self._seq)
                self._seq += 1
        except ConnectionLost as e:
            assert self._inbox is not None
            explained = self._inbox.explain(e, ABORT_GRACE_S)
            self._fail(explained)
            if explained is e:
                raise
            raise explained from e
        except MeshError as e:
            self._fail(e)
            raise
        except BaseException as e:
            self._fail(MeshError(f"rank {self.tp_rank}: collective {self._seq} interrupted: "
                                 f"{e!r}"))
            raise
        return tensor

    def watch(self) -> None:
        """Between collectives, without waiting: raise `MeshError` (and tell the other ranks,
        ABORT) if the mesh is broken, a peer was lost (dead, or silent past the heartbeat
        timeout), aborted, or is forming a new mesh. A rank that is not reducing learns this way
        that its group broke. Never call it while a collective runs on another thread."""
        if self.tp_size == 1:
            return
        if self._broken is not None:
            raise MeshError(f"mesh is broken ({self._broken})", self._broken.peer)
        assert self._inbox is not None and self._links is not None
        try:
            self._inbox.service(self._links.others)
        except MeshError as e:
            self._fail(e)
            raise

    def _use_ring(self, nbytes: int, threshold: int) -> bool:
        """Shared memory: its ring (also when scatter is forced: shm has no scatter) or its
        direct sum."""
        algorithm = self.config.algorithm
        return algorithm in ("ring", "scatter") or (algorithm == "auto" and nbytes >= threshold)

    def _fail(self, error: MeshError) -> None:
        """Mark the mesh broken and tell every other rank to abandon this collective (the
        failed one too: it may be alive, e.g. late, and would otherwise wait for our data)."""
        self._broken = error
        if self._links is not None and self._formation is not None:
            for peer in self._links.others:
                self._links.send(peer, control(
                    Kind.ABORT, self.tp_rank, self._formation.formation, self._seq,
                    failed=error.peer, reason=str(error)))

    def _teardown(self, linger_s: float = 0.0) -> None:
        if self._links is not None:
            self._links.close(linger_s)
        if self._shm is not None:
            self._shm.close()
        if self._streams is not None:
            self._streams.close()
        self._links = self._shm = self._inbox = self._formation = self._streams = None
        self._passing = None  # with its sends of closed sockets: nothing left to wait for
        self._broken = MeshError("the mesh has not been formed")

    def interrupt(self) -> None:
        """From another thread: a `form()` in progress (and any later one) gives up within a
        hello interval, so that a process can stop while it re-forms."""
        self._interrupted.set()

    def close(self) -> None:
        """Say BYE to the peers (if formed), wait up to `close_timeout_s` for theirs, and
        release every socket and mapping."""
        if self._broken is None and self._links is not None and self._formation is not None:
            for peer in self._links.others:
                self._links.send(peer, control(Kind.BYE, self.tp_rank,
                                               self._formation.formation))
            assert self._inbox is not None
            self._inbox.farewell(self.config.close_timeout_s)
        self._teardown(linger_s=0.2)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self._broken = MeshError("the mesh is closed")

    def __enter__(self) -> MeshGroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

