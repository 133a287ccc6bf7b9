"""The tcp data path on its own: real sockets on loopback, two ranks as threads of this process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from shard_svc.mesh.communicator import MeshError
from shard_svc.mesh.tcp import Streams, _advance
from shard_svc.mesh.tcp_open import INTRO, MAGIC, listen
from shard_svc.mesh.wire import HEADER, Kind

FORMATION = 0x1234_5678_9ABC


def header(sender: int, seq: int, nbytes: int, kind: int = Kind.DATA) -> bytes:
    return HEADER.pack(kind, 1, sender, 0, 1, FORMATION, seq, nbytes // 4, nbytes)


@contextmanager
def group(n: int, strangers: tuple[bytes, ...] = ()) -> Iterator[list[Streams]]:
    """Ranks 0 … n-1 joined by Streams.open; each of `strangers` (an introduction; empty: say
    nothing) connects to rank 0's listener first and must be turned away."""
    listeners = [listen("127.0.0.1", 0) for _ in range(n)]
    addrs = [f"127.0.0.1:{s.getsockname()[1]}" for s in listeners]
    intruders = []
    for intro in strangers:
        intruders.append(socket.create_connection(("127.0.0.1", listeners[0].getsockname()[1])))
        intruders[-1].sendall(intro)
    deadline = time.monotonic() + 5
    out: dict[int, Streams] = {}
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(  # type: ignore[misc]
        r, Streams.open(listeners[r], addrs, r, FORMATION, deadline, 2.0)))
        for r in range(1, n)]
    for t in threads:
        t.start()
    out[0] = Streams.open(listeners[0], addrs, 0, FORMATION, deadline, 2.0)
    for t in threads:
        t.join(5)
    for lst in listeners:
        lst.close()
    try:
        yield [out[r] for r in range(n)]
    finally:
        for streams in out.values():
            streams.close()
        for intruder in intruders:
            intruder.close()


@contextmanager
def pair(strangers: tuple[bytes, ...] = ()) -> Iterator[tuple[Streams, Streams]]:
    with group(2, strangers) as (a, b):
        yield a, b


def no_events(peers: list[int]) -> None:
    pass


def swap(a: Streams, b: Streams, x: torch.Tensor, y: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0 sends x and receives into one buffer, rank 1 sends y, both at once."""
    got_a, got_b = torch.empty_like(y), torch.empty_like(x)
    xb, yb = x.view(torch.uint8), y.view(torch.uint8)
    t = threading.Thread(target=b.exchange, args=(
        [(0, header(1, 0, yb.numel()), memoryview(yb.numpy()))],
        [(0, memoryview(got_b.view(torch.uint8).numpy()), header(0, 0, xb.numel()))], no_events))
    t.start()
    try:
        a.exchange([(1, header(0, 0, xb.numel()), memoryview(xb.numpy()))],
                   [(1, memoryview(got_a.view(torch.uint8).numpy()), header(1, 0, yb.numel()))],
                   no_events)
    finally:
        t.join(5)
    return got_a, got_b


@pytest.mark.parametrize("numel", [1, 513, 4 * 1024 * 1024])
def test_both_directions_arrive_intact_and_a_stranger_is_turned_away(numel: int) -> None:
    wrong_formation = INTRO.pack(MAGIC, FORMATION + 1, 1)
    with pair(strangers=(wrong_formation,)) as (a, b):
        x, y = torch.randn(numel), torch.randn(numel)
        got_a, got_b = swap(a, b, x, y)
        assert torch.equal(got_a, y) and torch.equal(got_b, x)


def test_silent_strangers_do_not_delay_the_peers() -> None:
    t0 = time.monotonic()
    with pair(strangers=(b"",) * 5 + (b"CMDS",)) as (a, b):
        assert time.monotonic() - t0 < 0.4
        got_a, got_b = swap(a, b, torch.arange(3.0), torch.arange(5.0, 8.0))
        assert got_a.tolist() == [5, 6, 7] and got_b.tolist() == [0, 1, 2]


def test_a_header_that_does_not_match_names_the_peer_and_writes_nothing() -> None:
    with pair() as (a, b):
        x = torch.randn(64)
        y = torch.randn(64)
        threading.Thread(target=lambda: b.socks[0].sendall(  # rank 1 claims seq 7
            header(1, 7, 256) + y.view(torch.uint8).numpy().tobytes())).start()
        dest = torch.zeros(256, dtype=torch.uint8)
        with pytest.raises(MeshError, match="rank 1 sent") as e:
            a.exchange([(1, header(0, 0, 256), memoryview(x.view(torch.uint8).numpy()))],
                       [(1, memoryview(dest.numpy()), header(1, 0, 256))], no_events)
        assert e.value.peer == 1
        assert not dest.any()  # the payload of a bad header never lands


def test_a_closed_connection_fails_at_once_and_a_silent_one_at_the_deadline() -> None:
    with pair() as (a, b):
        dest = torch.empty(16, dtype=torch.uint8)
        t0 = time.monotonic()
        with pytest.raises(MeshError, match="no data moved to or from rank 1 within 2s"):
            a.exchange([], [(1, memoryview(dest.numpy()), header(1, 0, 16))], no_events)
        assert 1.9 < time.monotonic() - t0 < 4
        b.close()
        t0 = time.monotonic()
        with pytest.raises(MeshError, match="rank 1 closed its data connection") as e:
            a.exchange([], [(1, memoryview(dest.numpy()), header(1, 0, 16))], no_events)
        assert e.value.peer == 1 and time.monotonic() - t0 < 0.5


def test_look_runs_between_waits_and_its_error_ends_the_exchange() -> None:
    def look(peers: list[int]) -> None:
        raise MeshError(f"rank 0: rank {peers[0]} aborted", peers[0])

    with pair() as (a, _):
        dest = torch.empty(16, dtype=torch.uint8)
        t0 = time.monotonic()
        with pytest.raises(MeshError, match="rank 1 aborted"):
            a.exchange([], [(1, memoryview(dest.numpy()), header(1, 0, 16))], look)
        assert time.monotonic() - t0 < 0.5


def test_look_runs_while_another_transfer_trickles() -> None:
    """A peer that keeps sending a little never keeps ZeroMQ's news (an ABORT) waiting."""
    def look(peers: list[int]) -> None:
        raise MeshError("rank 0: rank 2 aborted", 2)

    with pair() as (a, b):
        stop = threading.Event()

        def trickle() -> None:
            b.socks[0].sendall(header(1, 0, 1 << 20))
            while not stop.wait(0.01):
                b.socks[0].send(b"\0" * 64)

        threading.Thread(target=trickle, daemon=True).start()
        dest = torch.empty(1 << 20, dtype=torch.uint8)
        t0 = time.monotonic()
        try:
            with pytest.raises(MeshError, match="rank 2 aborted"):
                a.exchange([], [(1, memoryview(dest.numpy()), header(1, 0, 1 << 20))], look)
        finally:
            stop.set()
        assert time.monotonic() - t0 < 0.5


class CountingPoller:
    """A select.poll object that counts its poll calls."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def poll(self, timeout: int) -> list[tuple[int, int]]:
        self.calls += 1
        return self.inner.poll(timeout)  # type: ignore[no-any-return]

    def register(self, fd: int, mask: int) -> None:
        self.inner.register(fd, mask)

    def unregister(self, fd: int) -> None:
        self.inner.unregister(fd)


def test_an_early_message_or_a_closed_peer_does_not_spin_the_wait_for_another() -> None:
    """Rank 0 waits for rank 2 while rank 1 (already heard from) sends its next message early
    and then closes: rank 0 sleeps in poll instead of spinning on rank 1's ready socket, gets
    rank 2's message, and then the early one intact; rank 1's closed connection is an error
    only when rank 0 next needs it."""
    with group(3) as (a, b, c):
        x1, y1, x2 = torch.randn(8), torch.randn(8), torch.randn(8)
        got = {p: torch.empty(32, dtype=torch.uint8) for p in (1, 2)}

        def mv(t: torch.Tensor) -> memoryview:
            return memoryview(t.view(torch.uint8).numpy())

        b.socks[0].sendall(header(1, 0, 32) + x1.view(torch.uint8).numpy().tobytes())
        a.exchange([], [(1, mv(got[1]), header(1, 0, 32))], no_events, scratch=True)
        b.socks[0].sendall(header(1, 1, 32) + y1.view(torch.uint8).numpy().tobytes())
        b.close()

        def late() -> None:
            time.sleep(0.3)
            c.socks[0].sendall(header(2, 0, 32) + x2.view(torch.uint8).numpy().tobytes())

        polls = CountingPoller(a.poller)
        a.poller = polls  # type: ignore[assignment]
        threading.Thread(target=late).start()
        a.exchange([], [(2, mv(got[2]), header(2, 0, 32))], no_events, scratch=True)
        # Slept in poll (a few calls over 0.3 s, one per LOOK_S at most) instead of spinning on
        # rank 1's ready socket (thousands of calls).
        assert polls.calls < 30, polls.calls
        assert torch.equal(got[1].view(torch.float32), x1)
        assert torch.equal(got[2].view(torch.float32), x2)
        a.exchange([], [(1, mv(got[1]), header(1, 1, 32))], no_events)
        assert torch.equal(got[1].view(torch.float32), y1)
        with pytest.raises(MeshError, match="rank 1 closed its data connection"):
            a.exchange([], [(1, mv(got[1]), header(1, 2, 32))], no_events)


def test_advance_drops_sent_bytes_across_views() -> None:
    views = [memoryview(b"abc"), memoryview(b"defgh")]
    assert not _advance(views, 4)
    assert [bytes(v) for v in views] == [b"efgh"]
    assert _advance(views, 4) and views == []
