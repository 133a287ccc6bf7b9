"""The ports of `cpumesh local`: every one chosen at once, the fixed ones checked first.

A cluster needs `2 tp + 1` ports on loopback (tokenizer, shards, mesh) and the router's two on
`--host`, fixed (`--port`, `--http-port`) or any free one (0). `reserve` binds a socket for every
one of them and holds them all open until all are chosen, so the kernel can never hand out one
port twice (gRPC binds with SO_REUSEPORT: two servers on one port would both "succeed") nor a
port the user asked for. It is also the check that a fixed port is free, naming its flag.

A free port is drawn from below the kernel's ephemeral range (ip_local_port_range), never from
it: an outgoing connection takes its source port from that range, and a ZeroMQ peer connecting
to a mesh port in it before its rank has bound there can be handed that very port as its own
source: TCP connects the socket to itself, the ZeroMQ handshake fails, and the rank cannot bind
(seen once in CI: a tp-4 mesh that never formed, "rank 3 failed the ZeroMQ handshake").
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

FREE_LOW = 10000  # free ports are drawn from [FREE_LOW, the ephemeral range's start)


class Want(NamedTuple):
    host: str
    port: int = 0  # 0: any free port
    flag: str = ""  # the flag that chose `port`, named when it is busy


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _busy(want: Want, e: OSError) -> OSError:
    return OSError(f"cannot listen on {want.host}:{want.port} ({e.strerror}): is cpumesh already "
                   f"running? Pass {want.flag} with another number, or {want.flag} 0")


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _candidates() -> Iterator[int]:
    """Ports below the ephemeral range in random order (processes choosing at once rarely
    meet), then 0: the kernel's choice, where that range holds none free."""
    low, high = FREE_LOW, ephemeral_start()
    if high - low >= 1000:
        yield from random.Random().sample(range(low, high), high - low)
    while True:
        yield 0


def reserve(wants: Sequence[Want]) -> list[int]:
    """The port of each of `wants`, in order: its own when fixed (refused, naming its flag, when
    it cannot be bound), else a free one distinct from every other."""
    socks: dict[int, socket.socket] = {}
    candidates = _candidates()
    try:
        # The fixed ports first, so that none of them is handed out as a free one.
        for i in sorted(range(len(wants)), key=lambda i: wants[i].port == 0):
            want = wants[i]
            if not want.port:
                socks[i] = _bind_free(want.host, candidates)
                continue
            s = socks[i] = socket.socket(_family(want.host))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT ok
            try:
                s.bind((want.host, want.port))
            except OSError as e:
                raise _busy(want, e) from None
        return [socks[i].getsockname()[1] for i in range(len(wants))]
    finally:
        for s in socks.values():
            s.close()


def _bind_free(host: str, candidates: Iterator[int]) -> socket.socket:
    """A socket bound on `host` to the first of `candidates` that is free."""
    for port in candidates:
        s = socket.socket(_family(host))
        try:
            s.bind((host, port))
            return s
        except OSError:
            s.close()
            if port == 0:
                raise
    raise AssertionError("unreachable: the candidates end in 0 for ever")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free ports on `host`."""
    return reserve([Want(host)] * n)


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Raise, naming the flag that chooses this port, if it cannot be bound."""
    reserve([Want(host, port, flag)])


def addresses(host: str, port: int) -> tuple[str, str]:
    """(where to listen on `host`, where clients on this machine reach it)."""
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    local = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host)
    return listen, f"{local}:{port}" if local else listen


def listen_address(host: str, wanted: int, flag: str) -> tuple[str, str]:
    """`addresses` of port `wanted` (refused naming `flag` when busy), or of any free one
    when 0."""
    return addresses(host, reserve([Want(host, wanted, flag)])[0])
