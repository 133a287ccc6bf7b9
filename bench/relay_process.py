"""The delay relay (bench/delay_relay.py) as a child process, and how accurate it is.

A child process keeps the relay's threads apart from the caller's GIL. `accuracy` measures what
the relay really adds: ping-pongs on loopback straight to an echo server and through the relay.
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from bench.delay_relay import CHUNK, parse_address


class RelayProcess:
    """`python -m bench.delay_relay` in a child process (apart from the caller's GIL)."""

    def __init__(self, listen: str, target: str, delay_us: float = 0.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.delay_relay", "--listen", listen, "--target", target,
             "--delay-us", str(delay_us)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, start_new_session=True)
        first = self._line()
        if not first.startswith("listening "):
            self.close()
            raise RuntimeError(f"delay relay did not start: {first!r}")
        self.address = first.split()[1]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def set_delay(self, delay_us: float) -> None:
        if self._ask(f"delay {delay_us}") != "ok":
            raise RuntimeError("delay relay did not take the new delay")

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(self._ask("stats")))

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def echo_server() -> tuple[socket.socket, str]:
    """A loopback server that sends every byte back; returns (socket, "host:port")."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, f"127.0.0.1:{server.getsockname()[1]}"


def _echo(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        while data := conn.recv(CHUNK):
            conn.sendall(data)


def round_trips(address: str, size: int, rounds: int) -> list[float]:
    """Seconds for each of `rounds` ping-pongs of `size` bytes (after 5 unrecorded ones)."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    out = []
    with socket.create_connection(parse_address(address), timeout=10.0) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for k in range(rounds + 5):
            t0 = time.perf_counter()
            s.sendall(payload)
            got = 0
            while got < size:
                chunk = s.recv(CHUNK)
                if not chunk:
                    raise ConnectionError(f"{address} closed the connection")
                got += len(chunk)
            if k >= 5:
                out.append(time.perf_counter() - t0)
    return out


def accuracy(delays_us: list[float], size: int = 2304, rounds: int = 200) -> list[dict[str, Any]]:
    """Per setting: median round trip direct and through a relay process (loopback), and the
    one-way delay the relay added: (relay − direct) / 2."""
    server, echo = echo_server()
    rows = []
    relay = RelayProcess("127.0.0.1:0", echo)
    try:
        for d in delays_us:
            relay.set_delay(d)
            direct = statistics.median(round_trips(echo, size, rounds))
            relay.stats()
            via = round_trips(relay.address, size, rounds)
            held = relay.stats()
            med, p90 = statistics.median(via), sorted(via)[int(0.9 * (len(via) - 1))]
            rows.append({"delay_us": d, "bytes": size, "rounds": rounds,
                         "rtt_direct_us": direct * 1e6, "rtt_relay_us": med * 1e6,
                         "added_one_way_us": (med - direct) / 2 * 1e6,
                         "added_one_way_p90_us": (p90 - direct) / 2 * 1e6,
                         "held_us_median": held.get("held_us_median"),
                         "held_us_p99": held.get("held_us_p99")})
    finally:
        relay.close()
        server.close()
    return rows
