"""MeshGroup sums correctly: 2-4 real processes on loopback, every size, both dtypes, every data
path (tcp streams, ZeroMQ, shared memory), every algorithm; every rank ends with the same bits."""

from __future__ import annotations

import pytest
import torch

from shard_svc.mesh.config import MeshConfig
from shard_svc.mesh.group import MeshGroup
from tests.mesh_procs import ports, ranks
from tests.mesh_ranks import SIZES, rank_matrix

MESHES = [("tcp-direct", {"transport": "tcp", "algorithm": "direct"}),
          ("tcp-scatter", {"transport": "tcp", "algorithm": "scatter"}),
          ("tcp-ring", {"transport": "tcp", "algorithm": "ring"}),
          ("zmq-direct", {"transport": "zmq", "algorithm": "direct"}),
          ("zmq-scatter", {"transport": "zmq", "algorithm": "scatter"}),
          ("zmq-ring", {"transport": "zmq", "algorithm": "ring"}),
          ("shm-direct", {"transport": "shm", "algorithm": "direct"}),
          ("shm-ring", {"transport": "shm", "algorithm": "ring"})]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("tp_size", [2, 3, 4])
def test_sum_within_rounding_and_bitwise_equal_on_all_ranks(tp_size: int) -> None:
    meshes = [(label, ports(tp_size), overrides) for label, overrides in MESHES]
    if tp_size == 2:  # ZeroMQ ipc:// once; the default algorithm switch once
        meshes.append(("ipc-auto", ports(tp_size), {"transport": "ipc"}))
        meshes.append(("auto-auto", ports(tp_size), {}))
    with ranks() as r:
        for rank in range(tp_size):
            r.start(f"rank{rank}", rank_matrix, rank, meshes, SIZES)
        results = [r.wait(f"rank{rank}", "done", 140) for rank in range(tp_size)]
    assert len(results[0]) == len(meshes) * len(SIZES) * 2
    for key, (within, rank_order, err, digest) in results[0].items():
        label, transport = key[0], key[1]
        assert transport == (label.split("-")[0] if label != "auto-auto" else "shm"), key
        assert within, f"{key}: max error {err} beyond rounding"
        assert all(res[key][3] == digest for res in results), f"{key}: ranks differ"
        if label not in ("tcp-ring", "zmq-ring") or tp_size == 2:  # each chunk in ring order
            assert rank_order, f"{key}: not bitwise equal to sum_in_rank_order"


def test_single_rank_is_identity_and_needs_no_peers() -> None:
    with MeshGroup(MeshConfig(0, 1, ("127.0.0.1:1",))) as mesh:
        t = torch.arange(5.0)
        assert mesh.all_reduce(t) is t and t.tolist() == [0, 1, 2, 3, 4]
        assert mesh.transport == "none"


def test_rejects_tensors_it_cannot_sum() -> None:
    mesh = MeshGroup(MeshConfig(0, 1, ("127.0.0.1:1",)))
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        mesh.all_reduce(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        mesh.all_reduce(torch.zeros(4, 4).t())


@pytest.mark.parametrize(("field", "value", "message"), [
    ("tp_size", 17, "tp_size"), ("tp_rank", 2, "tp_rank"), ("peers", ("a:1",), "peers lists"),
    ("peers", ("a:1", "b"), "host:port"), ("peers", ("a:1", "a:1"), "twice"),
    ("transport", "udp", "transport"), ("algorithm", "tree", "algorithm"),
    ("ring_min_bytes", -1, "ring_min_bytes"), ("shm_slot_bytes", 1000, "shm_slot_bytes"),
    ("recv_timeout_s", 0, "recv_timeout_s"), ("heartbeat_timeout_s", 0.1, "heartbeat"),
    ("mesh_name", "a b", "mesh_name"), ("curve_secret_key", "/k", "CURVE"),
    ("stream_spin_s", -1e-6, "stream_spin_s"),
])
def test_config_refuses_bad_values(field: str, value: object, message: str) -> None:
    fields: dict[str, object] = dict(tp_rank=0, tp_size=2, peers=("a:1", "b:2"))
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        MeshConfig(**fields)  # type: ignore[arg-type]


def test_bind_and_peer_endpoints() -> None:
    k8s = MeshConfig(1, 2, ("shard-0.shard:5555", "shard-1.shard:5555"))
    assert k8s.bind_endpoint() == "tcp://*:5555"
    assert k8s.peer_endpoint(0) == "tcp://shard-0.shard:5555"
    local = MeshConfig(0, 2, ("127.0.0.1:7000", "127.0.0.1:7001"))
    assert local.bind_endpoint() == "tcp://127.0.0.1:7000"
    ipc = MeshConfig(0, 2, ("127.0.0.1:7000", "127.0.0.1:7001"), transport="ipc")
    assert ipc.bind_endpoint() == "ipc:///tmp/cpumesh-127.0.0.1-7000.sock"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["tcp", "zmq"])
def test_ipv6_addresses(transport: str) -> None:
    """Two ranks (threads) on [::1]: the ZeroMQ control and the tcp data path both take IPv6."""
    import threading

    from tests.procs import free_ports

    peers = tuple(f"[::1]:{p}" for p in free_ports(2))
    results: dict[int, torch.Tensor] = {}

    def rank(r: int) -> None:
        with MeshGroup(MeshConfig(r, 2, peers, transport=transport, form_timeout_s=20)) as mesh:
            assert mesh.transport == transport
            results[r] = mesh.all_reduce(torch.full((1000,), float(r + 1)))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(torch.equal(results[r], torch.full((1000,), 3.0)) for r in range(2))
