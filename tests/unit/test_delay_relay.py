"""The user-space delay relay of the multi-host sweep: bytes pass unchanged both ways, and
every chunk is held at least the set delay."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest

from bench.delay_relay import SPIN_S, Relay
from bench.netns import tbf_burst
from bench.relay_process import round_trips

INVERT = bytes(255 - b for b in range(256))


def _server() -> tuple[socket.socket, list[bytes]]:
    """Answers every byte with its complement (so the reply is not just our bytes); records
    what it received."""
    server = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 20):
                got.append(data)
                conn.sendall(data.translate(INVERT))

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server, got


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "relay closed the connection"
        buf += chunk
    return buf


@pytest.mark.parametrize("delay_s", [0.0, 0.02])
def test_bytes_pass_unchanged_and_late_enough(delay_s: float) -> None:
    server, got = _server()
    with server, Relay(("127.0.0.1", 0), server.getsockname()[:2], delay_s) as relay, \
            socket.create_connection(relay.address, timeout=5) as s:
        for size in (1, 2304, 300_000):
            message = os.urandom(size)
            t0 = time.perf_counter()
            s.sendall(message)
            assert _recv_exactly(s, size) == message.translate(INVERT)
            assert time.perf_counter() - t0 >= 2 * delay_s  # delayed each way
            assert b"".join(got)[-size:] == message
        stats = relay.stats()
        assert stats["chunks"] >= 6 and stats["held_us_min"] >= delay_s * 1e6
        s.shutdown(socket.SHUT_WR)  # end of stream passes through, both ways
        assert s.recv(1) == b""


def test_round_trips_through_a_relay_add_the_delay() -> None:
    server, _ = _server()
    with server, Relay(("127.0.0.1", 0), server.getsockname()[:2], 0.005) as relay:
        address = f"127.0.0.1:{relay.address[1]}"
        assert min(round_trips(address, 512, 10)) >= 0.010
        relay.set_delay(SPIN_S)  # the writer's sleep is about 0: it must never go negative
        assert len(round_trips(address, 512, 500)) == 500
        assert relay.stats()["drops"] == []


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="delay"):
        Relay(("127.0.0.1", 0), ("127.0.0.1", 1), -1.0)
    assert tbf_burst("10gbit") == "125000b" and tbf_burst("1mbit") == "16384b"
    with pytest.raises(ValueError, match="rate"):
        tbf_burst("fast")
