"""MeshGroup.watch: a rank between collectives learns, without waiting, that its group broke (a
peer re-forming, closing or gone), and the mesh then re-forms and sums again; strangers' HELLOs
to a formed mesh change nothing."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import pytest
import torch
import zmq

from shard_svc.mesh.communicator import MeshError
from shard_svc.mesh.group import MeshGroup
from shard_svc.mesh.hello import local_hello, settings
from shard_svc.mesh.wire import Kind, control
from tests.mesh_procs import ports
from tests.mesh_ranks import mesh_config


def form_pair(transport: str) -> list[MeshGroup]:
    mesh_ports = ports(2)
    groups: list[MeshGroup | None] = [None, None]

    def form(rank: int) -> None:
        groups[rank] = MeshGroup(mesh_config(rank, mesh_ports, transport=transport))

    threads = [threading.Thread(target=form, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(g is not None for g in groups), "the pair did not form"
    return [g for g in groups if g is not None]


def watch_until_broken(mesh: MeshGroup, deadline_s: float) -> MeshError:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            mesh.watch()
        except MeshError as e:
            return e
        time.sleep(0.05)
    raise AssertionError(f"watch() saw nothing within {deadline_s}s")


def sum_on_both(groups: list[MeshGroup]) -> list[list[float]]:
    out: list[list[float]] = [[], []]

    def reduce(rank: int) -> None:
        out[rank] = groups[rank].all_reduce(torch.full((5,), float(rank + 1))).tolist()

    threads = [threading.Thread(target=reduce, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn)
    t.start()
    return t


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["tcp", "zmq", "shm"])
def test_idle_rank_sees_its_peer_reform_and_both_form_again(transport: str) -> None:
    groups = form_pair(transport)
    try:
        assert sum_on_both(groups) == [[3.0] * 5] * 2
        groups[0].watch()  # a whole mesh: nothing to report
        old = groups[0].formation
        reforming = in_thread(lambda: groups[1].reform(20))  # rank 1 saw a failure
        error = watch_until_broken(groups[0], 5)
        assert error.peer == 1, error
        assert groups[0].formation is None
        with pytest.raises(MeshError):
            groups[0].watch()  # stays broken until re-formed
        groups[0].reform(20)
        reforming.join(20)
        assert groups[0].formation not in (None, old)
        assert groups[0].formation == groups[1].formation
        assert sum_on_both(groups) == [[3.0] * 5] * 2
    finally:
        for g in groups:
            g.close()


@pytest.mark.timeout(60)
def test_idle_rank_sees_its_peer_close() -> None:
    groups = form_pair("auto")
    try:
        closing = in_thread(groups[1].close)
        error = watch_until_broken(groups[0], 5)
        assert error.peer == 1 and "rank 1" in str(error), error
        closing.join(10)
    finally:
        groups[0].close()


def strangers_hellos(mesh_ports: list[int], target: int) -> list[list[bytes]]:
    """HELLOs to rank `target` of a formed pair that forming would refuse, each with a nonce
    the mesh never saw: bare ones, another group's (mesh name, fingerprint), an impostor's
    address, and one claiming the target's own rank."""
    claimed = 1 - target
    config = mesh_config(claimed, mesh_ports)
    real = {**settings(config), **asdict(replace(
        local_hello("0badc0de", None, "/dev/shm"), rank=claimed,
        address=config.peers[claimed])), "ack": None}
    return [control(Kind.HELLO, claimed, rank=claimed, nonce="f00d"),
            control(Kind.HELLO, claimed, **{**real, "mesh": "another-group"}),
            control(Kind.HELLO, claimed, **{**real, "fingerprint": "another-model/plan"}),
            control(Kind.HELLO, claimed, **{**real, "address": "127.0.0.1:1"}),
            control(Kind.HELLO, target, **{**real, "rank": target,
                                           "address": config.peers[target]})]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["tcp", "zmq"])
def test_strangers_hellos_never_break_a_formed_mesh(transport: str) -> None:
    """Someone who reaches the mesh ports (or a shard of another group pointed at them) keeps
    sending HELLOs to both ranks, in their idle time and during collectives: neither rank's
    watch() reports anything, every sum is right, and the formation stays the same."""
    groups = form_pair(transport)
    mesh_ports = [int(p.rpartition(":")[2]) for p in groups[0].config.peers]
    formation = groups[0].formation
    stop = threading.Event()

    def stranger() -> None:
        ctx = zmq.Context()
        socks = []
        for target in (0, 1):
            sock = ctx.socket(zmq.PUSH)
            sock.linger = 0
            sock.connect(f"tcp://127.0.0.1:{mesh_ports[target]}")
            socks.append((sock, strangers_hellos(mesh_ports, target)))
        while not stop.is_set():
            for sock, hellos in socks:
                for frames in hellos:
                    with contextlib.suppress(zmq.Again):
                        sock.send_multipart(frames, zmq.NOBLOCK)
            time.sleep(0.01)
        for sock, _ in socks:
            sock.close()
        ctx.term()

    sending = in_thread(stranger)
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # idle: both ranks look at their links
            for g in groups:
                g.watch()
            time.sleep(0.02)
        for _ in range(20):
            assert sum_on_both(groups) == [[3.0] * 5] * 2
        for g in groups:
            g.watch()
            assert g.formation == formation
            assert g._inbox is not None and g._inbox.strangers > 0
    finally:
        stop.set()
        sending.join(5)
        for g in groups:
            g.close()
