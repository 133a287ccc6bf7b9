"""MeshGroup.watch: a rank between collectives learns, without waiting, that its group broke (a
peer re-forming, closing or gone), and the mesh then re-forms and sums again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from shard_svc.mesh.communicator import MeshError
from shard_svc.mesh.group import MeshGroup
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
