"""`cpumesh local`'s ports: a busy router port is refused naming the flag that chooses it; every
port of a cluster is distinct, fixed ones included."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tools.local import LocalConfig, plan
from tools.local_ports import FREE_LOW, Want, ephemeral_start, free_ports, listen_address, reserve


@pytest.mark.parametrize(("field", "flag"), [("port", "--port"), ("http_port", "--http-port")])
def test_a_busy_port_names_its_flag(field: str, flag: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = LocalConfig(Path("."), "m", **{"port": 0, "http_port": 0, field: port})
        with pytest.raises(OSError, match=f"{port}.*Pass {flag} with another number"):
            listen_address(config.host, getattr(config, field), flag)
        other = "port" if field == "http_port" else "http_port"
        listen, reach = listen_address(config.host, getattr(config, other),
                                       "--" + other.replace("_", "-"))
        assert listen == reach and listen.startswith("127.0.0.1:")  # the other one: any free


def test_a_fixed_port_is_never_handed_out_as_a_free_one() -> None:
    (fixed,) = reserve([Want("127.0.0.1")])
    ports = reserve([Want("127.0.0.1")] * 300 + [Want("127.0.0.1", fixed, "--port")])
    assert ports[-1] == fixed
    assert len(set(ports)) == len(ports)


def test_every_port_of_a_cluster_is_distinct() -> None:
    """plan() reserves them all at once (the router once took the tokenizer's port: gRPC binds
    with SO_REUSEPORT, so both servers started). Each run can only catch a reuse by chance, so
    plan a few dozen clusters."""
    config = LocalConfig(Path("m"), "m", tp=3, port=0, http_port=0)
    for _ in range(50):
        children, router, http = plan(config, {})
        tokenizer, *shards, router_child = children
        argv = router_child.args
        peers = shards[0].args[shards[0].args.index("--peers") + 1].split(",")
        addresses = [tokenizer.address, *(s.address for s in shards), *peers, router,
                     http.removeprefix("http://"), argv[argv.index("--listen") + 1]]
        assert len(set(addresses)) == len(addresses) - 1  # the router's listen == its reach


def test_free_ports_lie_below_the_ephemeral_range() -> None:
    """An outgoing connection's source port comes from the ephemeral range: a mesh port there
    could be taken by a peer's own connect before its rank binds it (a TCP self-connect)."""
    start = ephemeral_start()
    chosen = free_ports(64)
    assert len(set(chosen)) == 64
    assert all(FREE_LOW <= p < start for p in chosen), (start, sorted(chosen)[-3:])
    for p in chosen[:8]:  # free indeed: each can be bound now
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
