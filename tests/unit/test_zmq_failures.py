"""MeshGroup never hangs: a killed, stopped or silent rank makes every other rank raise MeshError
naming it within 2 s, and the mesh forms again when the rank is back."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import zmq

from shard_svc.mesh.wire import Header, Kind
from tests.mesh_procs import ports, ranks
from tests.mesh_ranks import rank_aborting, rank_idle, rank_loop

DETECT_S = 2.0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["tcp", "zmq", "shm"])
def test_killed_rank_is_named_within_2s_and_the_mesh_reforms(transport: str) -> None:
    mesh_ports, victim = ports(3), 2
    overrides = {"transport": transport}
    with ranks() as r:
        for rank in range(3):
            r.start(f"rank{rank}", rank_loop, rank, mesh_ports, overrides, 1)
        for rank in range(3):
            assert r.wait(f"rank{rank}", "verified", 60) == transport
            r.wait(f"rank{rank}", "looping", 30)
        killed_at = time.monotonic()
        r.kill(f"rank{victim}", signal.SIGKILL)
        for rank in (0, 1):
            at, peer, message = r.wait(f"rank{rank}", "failed", 10)
            assert peer == victim, message
            assert at - killed_at < DETECT_S, f"rank {rank} took {at - killed_at:.2f}s"
            assert "reform" in r.wait(f"rank{rank}", "broken", 5)
        r.start("restarted", rank_loop, victim, mesh_ports, overrides, 0)
        for name in ("rank0", "rank1", "restarted"):
            assert r.wait(name, "verified", 60) == transport
            r.wait(name, "finished", 30)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_the_abort_names_the_culprit_though_the_aborting_rank_closes_at_once(
        transport: str) -> None:
    """Rank 1 aborts a collective (naming rank 2) and re-forms at once, closing its data
    connections and sending the new mesh's HELLO: rank 0, waiting for rank 1's data, names
    rank 2 (from the ABORT, which must still leave and be awaited), not rank 1 (whose
    connection closed, or whose new HELLO came, first)."""
    mesh_ports, overrides = ports(3), {"transport": transport}
    with ranks() as r:
        for rank in (0, 2):
            r.start(f"rank{rank}", rank_loop, rank, mesh_ports, overrides, 1)
        r.start("rank1", rank_aborting, 1, mesh_ports, overrides, 2)
        _, peer, message = r.wait("rank0", "failed", 30)
        assert peer == 2, message
        assert "aborted" in message
        for name in ("rank0", "rank1", "rank2"):
            r.wait(name, "finished", 60)


@pytest.mark.timeout(90)
def test_stopped_rank_is_named_within_2s_and_rejoins_when_continued() -> None:
    """SIGSTOP: the process lives but is silent; heartbeats find it. Its late messages belong
    to the old formation and are dropped after it rejoins."""
    mesh_ports, victim = ports(3), 1
    with ranks() as r:
        for rank in range(3):
            r.start(f"rank{rank}", rank_loop, rank, mesh_ports, {}, 1)
        for rank in range(3):
            r.wait(f"rank{rank}", "looping", 60)
        stopped_at = time.monotonic()
        r.kill(f"rank{victim}", signal.SIGSTOP)
        try:
            for rank in (0, 2):
                at, peer, message = r.wait(f"rank{rank}", "failed", 10)
                assert peer == victim, message
                assert at - stopped_at < DETECT_S, f"rank {rank} took {at - stopped_at:.2f}s"
        finally:
            r.kill(f"rank{victim}", signal.SIGCONT)
        r.wait(f"rank{victim}", "failed", 10)  # it finds its peers gone in turn
        for rank in range(3):
            r.wait(f"rank{rank}", "verified", 60)
            r.wait(f"rank{rank}", "finished", 30)


@pytest.mark.timeout(60)
def test_a_rank_that_never_calls_allreduce_is_named_after_the_receive_deadline() -> None:
    mesh_ports = ports(2)
    with ranks() as r:
        for rank in range(2):
            r.start(f"rank{rank}", rank_idle, rank, mesh_ports, {"recv_timeout_s": 1.0,
                                                                 "transport": "tcp"})
        waited, peer, message = r.wait("rank0", "failed", 40)
        assert peer == 1 and "rank 1" in message
        assert 1.0 <= waited < 1.0 + DETECT_S


@pytest.mark.timeout(90)
def test_forged_messages_are_never_summed() -> None:
    """DATA of another formation and garbage frames from a stranger's socket hit rank 0
    throughout; every sum stays exact (strangers' HELLOs: test_zmq_watch.py)."""
    mesh_ports = ports(2)
    stop = threading.Event()

    def forge() -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.linger = 0
        sock.connect(f"tcp://127.0.0.1:{mesh_ports[0]}")
        seq = 0
        while not stop.is_set():
            for s in range(4):
                header = Header(Kind.DATA, 1, 1, 0, 1, 12345, seq + s, 576, 576 * 4).pack()
                sock.send_multipart([header, b"\x7f" * 576 * 4])
            sock.send_multipart([b"garbage", b"more garbage"])
            sock.send(b"x")
            seq += 1
            time.sleep(0.001)
        sock.close()
        ctx.term()

    thread = threading.Thread(target=forge, daemon=True)
    with ranks() as r:
        for rank in range(2):
            r.start(f"rank{rank}", rank_loop, rank, mesh_ports, {"transport": "tcp"}, 1)
        thread.start()
        try:
            for rank in range(2):
                r.wait(f"rank{rank}", "looping", 60)
            time.sleep(1.0)  # the loops assert every sum while the forger keeps going
        finally:
            stop.set()
            thread.join(5)
        for rank in range(2):
            r.kill(f"rank{rank}", signal.SIGKILL)
