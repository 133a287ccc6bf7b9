"""Real mesh ranks for tests: each rank a spawned process reporting to the parent over a pipe.

Children run the `rank_*` functions of tests.mesh_ranks. Every report is (name, kind, payload);
the parent waits for reports with deadlines and kills every child it started when the block ends.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tests.procs import free_ports


class Ranks:
    """Spawned rank processes, each reporting on its own pipe (a queue shared by all would
    deadlock the others when one is killed while holding its lock)."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: dict[str, Any] = {}
        self.pipes: dict[Any, str] = {}
        self.pending: list[tuple[str, str, Any]] = []

    def start(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(name, fn, args, writer), daemon=True)
        proc.start()
        writer.close()
        self.procs[name] = proc
        self.pipes[reader] = name

    def wait(self, name: str, kind: str, timeout: float) -> Any:
        """The payload of `name`'s next report of `kind`; fails on its error or the deadline."""
        end = time.monotonic() + timeout
        while True:
            for i, (n, k, payload) in enumerate(self.pending):
                if n == name and k in (kind, "crash"):
                    del self.pending[i]
                    if k == "crash":
                        raise AssertionError(f"{name} failed:\n{payload}")
                    return payload
            remaining = end - time.monotonic()
            ready = mp.connection.wait(list(self.pipes), max(0.0, remaining))
            for reader in ready:
                try:
                    self.pending.append(reader.recv())
                except EOFError:  # the child exited (or was killed)
                    del self.pipes[reader]
            if not ready and remaining <= 0:
                self.dump_stacks()
                raise AssertionError(f"{name}: no {kind!r} report within {timeout}s; "
                                     f"other reports: {self.pending}")

    def dump_stacks(self) -> None:
        """Ask every live child to print its threads' stacks (to the captured stderr)."""
        import os
        import signal

        for proc in self.procs.values():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.5)

    def kill(self, name: str, sig: int = 9) -> None:
        import os

        os.kill(self.procs[name].pid, sig)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
        for proc in self.procs.values():
            proc.join(5)


@contextmanager
def ranks() -> Iterator[Ranks]:
    r = Ranks()
    try:
        yield r
    finally:
        r.close()


def ports(n: int) -> list[int]:
    return free_ports(n)


def _child(name: str, fn: Callable[..., Any], args: tuple[Any, ...], pipe: Any) -> None:
    import faulthandler
    import signal
    import sys

    import torch

    print(f"{name}: pid {__import__('os').getpid()}", file=sys.stderr, flush=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    torch.set_num_threads(1)
    try:
        fn(lambda kind, payload=None: pipe.send((name, kind, payload)), *args)
    except BaseException:
        pipe.send((name, "crash", traceback.format_exc()))
