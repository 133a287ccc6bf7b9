"""A burst client that does not itself dominate what it measures (issue 16).

    results = burst_processes("127.0.0.1:50051", data, n=32, rounds=5, procs=4)
    # [(status name, seconds), ...]: every call of every round

One asyncio process sending 32 calls at once spends more time starting them and reading their
answers than a server that refuses them at once spends refusing them: its own loop is most of
what it measures. Here `procs` processes each run n / procs threads with grpc's synchronous
client (C-core: a thread waiting for its call holds no GIL). Every thread of every process waits
at one barrier; then each sends its one call of the round and times it itself, from just before
the call to its status, so the barrier's release order never counts. The same client measures
the router and the floor, in the same run: `refusing_server`, a bare grpc.aio server in a process
of its own (no interceptors) that refuses every Generate at once with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
import time
from collections.abc import AsyncIterator, Iterator
from multiprocessing.synchronize import Barrier

import grpc

METHOD = "/cpumesh.v1.RouterService/Generate"
BARRIER_S = 60.0  # longest wait for every thread to reach a round's start


def _call(stub: grpc.UnaryStreamMultiCallable, data: bytes, timeout: float) -> tuple[str, float]:
    t0 = time.perf_counter()
    try:
        for _ in stub(data, timeout=timeout):
            pass
        return "OK", time.perf_counter() - t0
    except grpc.RpcError as e:
        return e.code().name, time.perf_counter() - t0  # type: ignore[attr-defined]


def _worker(address: str, data: bytes, threads: int, rounds: int, barrier: Barrier,
            out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """One client process: `threads` threads on one channel, one call each per round."""
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = channel.unary_stream(METHOD)
        results: list[tuple[str, float]] = []
        lock = threading.Lock()

        def run() -> None:
            for _ in range(rounds):
                barrier.wait(BARRIER_S)
                r = _call(stub, data, 60.0)
                with lock:
                    results.append(r)
                barrier.wait(BARRIER_S)  # the round is over for everyone

        pool = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    out.put(results)


def burst_processes(address: str, data: bytes, n: int, rounds: int, procs: int = 4,
                    pause_s: float = 1.0) -> list[tuple[str, float]]:
    """`rounds` bursts of `n` concurrent Generate calls carrying `data` (serialized request
    bytes), `pause_s` apart, from `procs` processes (n must be a multiple of procs)."""
    if n % procs:
        raise ValueError(f"a burst of {n} does not split evenly over {procs} processes")
    mp = multiprocessing.get_context("spawn")
    barrier = mp.Barrier(n + 1)  # every thread, and us: we pace the rounds
    out = mp.Queue()
    workers = [mp.Process(target=_worker, args=(address, data, n // procs, rounds, barrier, out),
                          daemon=True) for _ in range(procs)]
    for w in workers:
        w.start()
    try:
        for _ in range(rounds):
            barrier.wait(BARRIER_S)  # go
            barrier.wait(BARRIER_S)  # every call of the round ended
            time.sleep(pause_s)
        results: list[tuple[str, float]] = []
        for _ in workers:
            results += out.get(timeout=60)
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
    return results


def _refusing_server(port: object) -> None:
    """Serve until terminated, refusing every Generate at once; its port into `port`."""
    async def refuse(data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue full")
        yield b""

    async def run() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "cpumesh.v1.RouterService",
            {"Generate": grpc.unary_stream_rpc_method_handler(refuse)})])
        port.value = server.add_insecure_port("127.0.0.1:0")  # type: ignore[attr-defined]
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


@contextlib.contextmanager
def refusing_server() -> Iterator[str]:
    """The floor for comparison: the address of a running `_refusing_server`."""
    mp = multiprocessing.get_context("spawn")
    port = mp.Value("i", 0)
    server = mp.Process(target=_refusing_server, args=(port,), daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 60
        while port.value == 0:
            if time.monotonic() > deadline or not server.is_alive():
                raise RuntimeError("the refusing server did not start within 60 s")
            time.sleep(0.05)
        yield f"127.0.0.1:{port.value}"
    finally:
        server.terminate()
        server.join(10)
