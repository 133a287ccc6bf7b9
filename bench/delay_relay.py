"""A TCP relay that adds a fixed one-way delay: link latency emulated in user space.

    python -m bench.delay_relay --listen 10.77.1.1:0 --target 10.77.1.2:5600 --delay-us 200

The kernel's `sch_netem` (the usual way to delay packets) is missing on machines such as this
benchmark's, so the multi-host sweep puts this relay on the path between two ranks instead. Each
accepted connection gets one to `target`; per direction a reader thread stamps every chunk it
reads and a writer thread writes it on no earlier than `delay` after that stamp (sleeping with a
1 µs timer slack). Delay is thus added per chunk, not per packet, on top of one more pass through
user space; `Relay.stats()` reports how long chunks were actually held, so the report can state
how close to the setting the emulation came.

Run as a process (as bench/relay_process.py starts it), it prints `listening HOST:PORT`, then
obeys lines on stdin: `delay US` (answers `ok`), `stats` (answers one JSON line and starts
counting afresh); it exits at end of input.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import socket
import statistics
import sys
import threading
import time
from typing import Any

PR_SET_TIMERSLACK = 29
CHUNK = 256 * 1024
SPIN_S = 60e-6  # sleep to this short of a deadline, then spin (wake-ups are late by ~30 µs)


def tight_timer_slack(ns: int = 1000) -> bool:
    """Make this thread's (and the threads it starts) sleeps end within `ns` of the deadline
    (Linux default: 50 µs). Returns whether the kernel accepted it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(ns), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


class Relay:
    """Listens on `listen`; forwards every connection to `target` with `delay_s` each way."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> None:
        if delay_s < 0:
            raise ValueError(f"delay must be >= 0, got {delay_s}")
        self.target = target
        self.delay_s = delay_s
        self.server = socket.create_server(listen, reuse_port=False)
        self.address = self.server.getsockname()[:2]
        self._held: list[float] = []  # seconds each chunk spent in the relay
        self._drops: list[str] = []  # why connections were dropped
        self.connections = 0
        self._lock = threading.Lock()
        self._closing = False
        self._socks: list[socket.socket] = []
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> Relay:
        tight_timer_slack()  # inherited by every thread started below
        self._accept.start()
        return self

    def set_delay(self, delay_s: float) -> None:
        if delay_s < 0:
            raise ValueError(f"delay must be >= 0, got {delay_s}")
        self.delay_s = delay_s

    def stats(self, reset: bool = True) -> dict[str, Any]:
        """Chunks forwarded and how long they were held (µs), since the last reset."""
        with self._lock:
            held, self._held = (self._held, []) if reset else (list(self._held), self._held)
            drops, self._drops = (self._drops, []) if reset else (list(self._drops), self._drops)
        out: dict[str, Any] = {"delay_us": self.delay_s * 1e6, "chunks": len(held),
                               "connections": self.connections, "drops": drops}
        if held:
            us = sorted(h * 1e6 for h in held)
            out |= {"held_us_median": statistics.median(us), "held_us_min": us[0],
                    "held_us_p90": us[int(0.9 * (len(us) - 1))],
                    "held_us_p99": us[int(0.99 * (len(us) - 1))], "held_us_max": us[-1]}
        return out

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for s in list(self._socks):
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                down, _ = self.server.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target, timeout=5.0)
                up.settimeout(None)
            except OSError:
                down.close()  # the target is not listening yet: the client will retry
                continue
            self.connections += 1
            for s in (down, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks += [down, up]
            for src, dst in ((down, up), (up, down)):
                pipe = _Pipe(src, dst, self)
                threading.Thread(target=pipe.read, daemon=True).start()
                threading.Thread(target=pipe.write, daemon=True).start()

    def _record(self, held: float) -> None:
        with self._lock:
            self._held.append(held)


class _Pipe:
    """One direction of one connection. The reader is the only producer: when nothing is
    queued and there is no delay it writes the chunk itself (no thread hand-off, whose wake-up
    costs tens of µs); otherwise the writer sleeps to `SPIN_S` before the deadline, then spins."""

    def __init__(self, src: socket.socket, dst: socket.socket, relay: Relay) -> None:
        self.src, self.dst, self.relay = src, dst, relay
        self.pending: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = threading.Condition()
        self.eof = False

    def read(self) -> None:
        try:
            while data := self.src.recv(CHUNK):
                stamp = time.perf_counter()
                with self.ready:
                    direct = not self.pending and self.relay.delay_s == 0
                    if not direct:
                        self.pending.append((stamp, data))
                        self.ready.notify()
                if direct:
                    self.dst.sendall(data)
                    self.relay._record(time.perf_counter() - stamp)
        except OSError as e:
            self._drop(e)
        with self.ready:
            self.eof = True
            self.ready.notify()

    def write(self) -> None:
        try:
            while True:
                with self.ready:
                    while not self.pending and not self.eof:
                        self.ready.wait()
                    if not self.pending:
                        break
                    stamp, data = self.pending[0]  # stays queued until written: keeps order
                deadline = stamp + self.relay.delay_s
                if (sleep := deadline - SPIN_S - time.perf_counter()) > 0:
                    time.sleep(sleep)
                while time.perf_counter() < deadline:
                    pass
                self.dst.sendall(data)
                self.relay._record(time.perf_counter() - stamp)
                with self.ready:
                    self.pending.popleft()
            self.dst.shutdown(socket.SHUT_WR)  # pass the end of stream on
        except OSError as e:  # either side broke: drop both, the client reconnects
            self._drop(e)

    def _drop(self, error: OSError) -> None:
        with self.relay._lock:
            self.relay._drops.append(f"{type(error).__name__}: {error}")
        for s in (self.src, self.dst):
            with contextlib.suppress(OSError):
                s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="host:port (port 0: any)")
    p.add_argument("--target", required=True, help="host:port to forward to")
    p.add_argument("--delay-us", type=float, default=0.0, help="one-way delay, microseconds")
    a = p.parse_args(argv)
    with Relay(parse_address(a.listen), parse_address(a.target), a.delay_us * 1e-6) as relay:
        print(f"listening {relay.address[0]}:{relay.address[1]}", flush=True)
        for line in sys.stdin:
            word, *rest = line.split()
            if word == "delay" and rest:
                relay.set_delay(float(rest[0]) * 1e-6)
                print("ok", flush=True)
            elif word == "stats":
                print(json.dumps(relay.stats()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
