"""Forming the mesh: a peer with another fingerprint or world size, a second process claiming
a rank, or a CURVE peer with an unknown key is refused with an error that says which; a mesh
that cannot form says who never answered."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from shard_svc.mesh.group import create_curve_keys
from shard_svc.mesh.wire import Kind, control
from tests.mesh_procs import ports, ranks
from tests.mesh_ranks import rank_form

FAST = {"form_timeout_s": 4.0, "hello_interval_s": 0.1}


@pytest.mark.timeout(60)
def test_wrong_fingerprint_is_refused_on_both_sides() -> None:
    mesh_ports = ports(2)
    with ranks() as r:
        r.start("rank0", rank_form, 0, mesh_ports, {**FAST, "fingerprint": "model-a/tp2"})
        r.start("rank1", rank_form, 1, mesh_ports, {**FAST, "fingerprint": "model-b/tp2"})
        for rank, other in ((0, 1), (1, 0)):
            peer, message = r.wait(f"rank{rank}", "refused", 30)
            assert peer == other and "fingerprint" in message, message
            assert "'model-a/tp2'" in message and "'model-b/tp2'" in message, message


@pytest.mark.timeout(60)
def test_wrong_world_size_is_refused() -> None:
    mesh_ports = ports(3)
    with ranks() as r:
        r.start("rank0", rank_form, 0, mesh_ports[:2], FAST)
        r.start("rank1", rank_form, 1, mesh_ports, FAST)
        for rank, other in ((0, 1), (1, 0)):
            peer, message = r.wait(f"rank{rank}", "refused", 30)
            assert peer == other and "has size" in message, message
            assert ("size 3, ours is 2" in message) or ("size 2, ours is 3" in message), message


@pytest.mark.timeout(60)
def test_duplicate_rank_is_refused() -> None:
    """A second process claims rank 1 (listening elsewhere): rank 0 refuses it and tells it
    why; the true rank 1 joins."""
    a, b, c = ports(3)
    with ranks() as r:
        r.start("rank0", rank_form, 0, [a, b], {**FAST, "form_timeout_s": 40.0})
        r.start("impostor", rank_form, 1, [a, c], {**FAST, "form_timeout_s": 40.0})
        peer, message = r.wait("impostor", "refused", 40)
        assert peer == 0 and "refused by rank 0: duplicate rank 1" in message, message
        assert f"claims it at 127.0.0.1:{c}, our peers list has rank 1 at 127.0.0.1:{b}" \
            in message, message
        r.start("rank1", rank_form, 1, [a, b], FAST)
        for rank in range(2):
            assert r.wait(f"rank{rank}", "sum", 30) == [3.0] * 8


@pytest.mark.timeout(60)
def test_silent_peers_are_listed_when_the_deadline_passes() -> None:
    mesh_ports = ports(3)
    with ranks() as r:
        r.start("rank0", rank_form, 0, mesh_ports, {**FAST, "form_timeout_s": 2.0})
        peer, message = r.wait("rank0", "refused", 30)
        assert peer == 1 and "did not form within 2s" in message
        assert f"rank 1 (127.0.0.1:{mesh_ports[1]})" in message
        assert f"rank 2 (127.0.0.1:{mesh_ports[2]})" in message


def curve(keys: Path, rank: int, secret_dir: Path | None = None) -> dict[str, object]:
    return {"curve_secret_key": (secret_dir or keys) / f"rank-{rank}.key_secret",
            "curve_public_keys": keys, "transport": "zmq"}


@pytest.mark.timeout(60)
def test_curve_peer_with_unknown_key_is_refused(tmp_path: Path) -> None:
    create_curve_keys(tmp_path / "keys", 2)
    create_curve_keys(tmp_path / "stranger", 2)  # rank 1 holds a key pair rank 0 never saw
    mesh_ports = ports(2)
    with ranks() as r:
        r.start("rank0", rank_form, 0, mesh_ports, {**FAST, **curve(tmp_path / "keys", 0)})
        r.start("rank1", rank_form, 1, mesh_ports,
                {**FAST, **curve(tmp_path / "keys", 1, tmp_path / "stranger")})
        peer, message = r.wait("rank0", "refused", 30)
        assert peer == 1 and "unknown CURVE key was refused" in message, message
        peer, message = r.wait("rank1", "refused", 30)
        assert peer == 0 and "rank 0 refused our CURVE key" in message, message


@pytest.mark.timeout(60)
def test_curve_mesh_sums_and_strangers_never_contribute(tmp_path: Path) -> None:
    """A CURVE mesh forms and sums exactly while a plaintext stranger and a stranger with an
    unknown key keep sending HELLOs and DATA to rank 0."""
    keys = tmp_path / "keys"
    create_curve_keys(keys, 2)
    _, stranger_secret = create_curve_keys(tmp_path / "stranger", 1)[0]
    mesh_ports = ports(2)
    stop = threading.Event()

    def stranger(use_curve: bool) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.linger = 0
        if use_curve:
            sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(
                stranger_secret)
            sock.curve_serverkey = zmq.auth.load_certificate(keys / "rank-0.key")[0]
        sock.connect(f"tcp://127.0.0.1:{mesh_ports[0]}")
        while not stop.is_set():
            with contextlib.suppress(zmq.Again):
                sock.send_multipart(control(Kind.HELLO, 1, rank=1, nonce="f00d"), zmq.NOBLOCK)
            time.sleep(0.01)
        sock.close()
        ctx.term()

    threads = [threading.Thread(target=stranger, args=(c,), daemon=True) for c in (False, True)]
    for t in threads:
        t.start()
    try:
        with ranks() as r:
            for rank in range(2):
                r.start(f"rank{rank}", rank_form, rank, mesh_ports, curve(keys, rank))
            for rank in range(2):
                r.wait(f"rank{rank}", "formed", 60)
                assert r.wait(f"rank{rank}", "sum", 30) == [3.0] * 8
    finally:
        stop.set()
        for t in threads:
            t.join(5)
