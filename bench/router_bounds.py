"""The router's bounds before work, against a real router process (issue 16, items 3 and 5).

    python -m bench.router_bounds [--model-dir DIR] [--max-waiting 8] [--big-mb 60] [--only-burst]

Real processes on loopback: a tokenizer, one SmolLM2 shard and a router with its defaults but
`--max-waiting` (and `--http-listen`). Measured from the client:

* bursts of 4 x max-waiting concurrent requests: how many are refused (RESOURCE_EXHAUSTED), how
  long each refusal took (median, p99, max, from its call's start to its status), and that the
  admitted ones complete; against the same bursts to a bare grpc.aio server that refuses every
  call at once (the floor: gRPC's own cost per call in Python, client and server);
* one over-long prompt (300 kB) at a time: the refusal's latency, for comparison;
* a chat of 1,000,000 empty messages (serialized beforehand, ~8 MB): the refusal's latency;
* six concurrent oversized prompts while a greedy stream runs: over gRPC at `--big-mb` MB (over
  `--max-request-bytes`) and at 12 MB (under it, over `--max-prompt-bytes`), and over HTTP at
  `--big-mb` MB: their outcomes, the router's RSS growth (peak, and held 1 s after), and the
  stream's largest inter-token gap (the stream runs in a process of its own), against the same
  stream alone. Refusal times of the flood include sending the bytes.
Prints a table; timings are this machine's, with every process sharing its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import psutil

from tests.procs import Service, free_ports, wait_serving
from tools.client import RouterClient, generate_request

MB = 1024 * 1024
STREAM_TOKENS = 48
BURST_ROUNDS = 5


class RssSampler:
    """The peak RSS of a process, sampled every 5 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc, self.peak = psutil.Process(pid), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def raw_generate(client: RouterClient, data: bytes, timeout: float = 60) -> tuple[str, float]:
    """Send pre-serialized GenerateRequest bytes; (status name, seconds to the end)."""
    call = client.channel.unary_stream("/cpumesh.v1.RouterService/Generate")
    t0 = time.perf_counter()
    try:
        async for _ in call(data, timeout=timeout):
            pass
        return "OK", time.perf_counter() - t0
    except grpc.aio.AioRpcError as e:
        return e.code().name, time.perf_counter() - t0


async def stream_gaps(client: RouterClient, started: object | None = None) -> list[float]:
    """A greedy stream's inter-token gaps (s); `started` (an Event) is set after 5 tokens."""
    arrivals: list[float] = []
    async for r in client.generate("Once upon a time, in a small village,", timeout=120,
                                   max_new_tokens=STREAM_TOKENS, temperature=0.0,
                                   ignore_eos=True):
        arrivals.extend([time.perf_counter()] * max(1, len(r.token_ids)))
        if started is not None and len(arrivals) >= 5:
            started.set()  # type: ignore[attr-defined]
    return [b - a for a, b in itertools.pairwise(arrivals) if b > a]


def _stream_process(router: str, started: object, out: object) -> None:
    """In its own process, so that the flooding client's work never delays its arrivals."""
    async def run() -> list[float]:
        async with RouterClient(router) as client:
            return await stream_gaps(client, started)

    out.put(asyncio.run(run()))  # type: ignore[attr-defined]


async def burst(client: RouterClient, n: int, rounds: int = BURST_ROUNDS) -> dict[str, object]:
    """`rounds` bursts of `n` concurrent requests (1 s apart); every refusal's latency, measured
    from its call's start to its status at the client, pooled."""
    async def one(i: int) -> tuple[str, float]:
        return await raw_generate(client, generate_request(
            f"Request {i}: say something.", max_new_tokens=8).SerializeToString())

    results: list[tuple[str, float]] = []
    for _ in range(rounds):
        results += await asyncio.gather(*(one(i) for i in range(n)))
        await asyncio.sleep(1.0)
    refused = [t for code, t in results if code == "RESOURCE_EXHAUSTED"]
    return {"sent": n * rounds, "refused": len(refused),
            "completed": sum(c == "OK" for c, _ in results),
            "other": sorted({c for c, _ in results} - {"OK", "RESOURCE_EXHAUSTED"}),
            "refusal_ms": [1e3 * t for t in refused]}


def _refusing_server(port: object) -> None:
    """The floor for comparison: a bare grpc.aio server (a process of its own, no interceptors)
    that refuses every Generate at once with RESOURCE_EXHAUSTED. Runs until terminated."""
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


async def burst_floor(n: int, rounds: int = BURST_ROUNDS) -> list[float]:
    """Refusal latencies (ms) of the same bursts against `_refusing_server`."""
    mp = multiprocessing.get_context("spawn")
    port = mp.Value("i", 0)
    server = mp.Process(target=_refusing_server, args=(port,), daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 60
        while port.value == 0:
            if time.monotonic() > deadline or not server.is_alive():
                raise RuntimeError("the refusing server did not start within 60 s")
            await asyncio.sleep(0.05)
        async with RouterClient(f"127.0.0.1:{port.value}") as client:
            b = await burst(client, n, rounds)
    finally:
        server.terminate()
        server.join(10)
    floor = b["refusal_ms"]
    assert isinstance(floor, list) and b["refused"] == n * rounds, b
    return floor


def percentiles(ms: list[float]) -> str:
    if not ms:
        return "no refusals"
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return f"median {statistics.median(ms):.1f}, p99 {q[98]:.1f}, max {max(ms):.1f}"


async def flood(client: RouterClient, http: str, sampler: RssSampler, kind: str, size: int
                ) -> dict[str, object]:
    """Six concurrent `size`-byte prompts while a stream runs."""
    prompt = "a" * size
    data = generate_request(prompt, max_new_tokens=4).SerializeToString()
    body = b'{"prompt": "' + prompt.encode() + b'", "max_tokens": 4}'
    mp = multiprocessing.get_context("spawn")
    started, out = mp.Event(), mp.Queue()
    streamer = mp.Process(target=_stream_process, args=(client.address, started, out))
    streamer.start()
    if not await asyncio.to_thread(started.wait, 120):
        raise RuntimeError("the stream did not start within 120 s")
    base = sampler.rss()
    sampler.peak = base

    async def post(session: aiohttp.ClientSession) -> tuple[str, float]:
        t0 = time.perf_counter()
        try:
            async with session.post(f"{http}/v1/completions", data=body,
                                    headers={"Content-Type": "application/json"}) as r:
                return f"HTTP {r.status}", time.perf_counter() - t0
        except aiohttp.ClientError as e:
            return type(e).__name__, time.perf_counter() - t0

    if kind == "gRPC":
        results = await asyncio.gather(*(raw_generate(client, data) for _ in range(6)))
    else:
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(post(session) for _ in range(6)))
    gaps = await asyncio.to_thread(out.get, True, 120)
    streamer.join(10)
    await asyncio.sleep(1.0)
    return {"what": f"6 x {size // MB} MB prompts, {kind}",
            "outcome": ", ".join(sorted({c for c, _ in results})),
            "refusal_ms": max(1e3 * t for _, t in results),
            "peak_mb": (sampler.peak - base) / MB, "held_mb": (sampler.rss() - base) / MB,
            "max_gap_ms": 1e3 * max(gaps)}


async def measure(router_addr: str, http: str, pid: int, max_waiting: int, big: int,
                  only_burst: bool = False
                  ) -> tuple[dict[str, object], float, list[dict[str, object]], list[float]]:
    async with RouterClient(router_addr) as client:
        await stream_gaps(client)  # warm up
        b = await burst(client, 4 * max_waiting)
        b["floor_ms"] = await burst_floor(4 * max_waiting)
        if only_burst:
            return b, float("nan"), [], []
        chat = generate_request(messages=[("user", "")] * 1_000_000).SerializeToString()
        code, chat_s = await raw_generate(client, chat)
        assert code == "INVALID_ARGUMENT", code
        one = generate_request("a" * 300_000).SerializeToString()  # over --max-prompt-bytes
        singles = [1e3 * (await raw_generate(client, one))[1] for _ in range(20)]
        b["single_ms"] = statistics.median(singles)
        alone = await stream_gaps(client)
        with RssSampler(pid) as sampler:
            rows = [await flood(client, http, sampler, "gRPC", big * MB),
                    await flood(client, http, sampler, "gRPC", 12 * MB),
                    await flood(client, http, sampler, "HTTP", big * MB)]
        return b, 1e3 * chat_s, rows, alone


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--max-waiting", type=int, default=8)
    p.add_argument("--big-mb", type=int, default=60)
    p.add_argument("--only-burst", action="store_true", help="measure the bursts alone")
    args = p.parse_args(argv)
    model_dir = args.model_dir
    if model_dir is None:
        from model_formats.embedded import default_model_dir
        model_dir = default_model_dir()
    log_dir = Path(tempfile.mkdtemp(prefix="cpumesh-bench-"))
    tok, shard, peer, router, http = (f"127.0.0.1:{p}" for p in free_ports(5))
    services = [
        Service("tokenizer", ["-m", "tokenizer_svc", "--model-dir", str(model_dir),
                              "--listen", tok], log_dir),
        Service("shard0", ["-m", "shard_svc", "--model-dir", str(model_dir), "--tp-size", "1",
                           "--tp-rank", "0", "--peers", peer, "--listen", shard, "--threads",
                           "1", "--kv-capacity-tokens", "16384"], log_dir),
        Service("router", ["-m", "router_svc", "--tokenizer", tok, "--shards", shard,
                           "--listen", router, "--http-listen", http,
                           "--max-waiting", str(args.max_waiting)], log_dir)]
    try:
        for s in services:
            s.start()
        wait_serving(router, services[2], deadline_s=180)
        pid = services[2].proc.pid  # type: ignore[union-attr]
        b, chat_ms, rows, alone = asyncio.run(measure(router, f"http://{http}", pid,
                                                      args.max_waiting, args.big_mb,
                                                      args.only_burst))
    finally:
        for s in reversed(services):
            s.stop()
    ms, floor = b["refusal_ms"], b["floor_ms"]
    assert isinstance(ms, list) and isinstance(floor, list)
    print(f"\nrouter bounds (SmolLM2, tp 1; router defaults, --max-waiting {args.max_waiting}; "
          f"logs in {log_dir})\n")
    print(f"{BURST_ROUNDS} bursts of {4 * args.max_waiting}: {b['refused']} of {b['sent']} "
          f"refused RESOURCE_EXHAUSTED, {b['completed']} completed, other {b['other'] or 'none'}")
    print(f"  refusal ms, router:               {percentiles(ms)}")
    print(f"  refusal ms, bare grpc.aio server: {percentiles(floor)} (refuses every call at "
          "once: gRPC's own floor in Python)")
    if ms and floor:
        print(f"  router / floor, median: {statistics.median(ms) / statistics.median(floor):.2f}")
    if args.only_burst:
        return
    print(f"one 300 kB prompt at a time (x20): INVALID_ARGUMENT in {b['single_ms']:.1f} ms "
          "(median)")
    print(f"chat of 1,000,000 empty messages: INVALID_ARGUMENT in {chat_ms:.1f} ms")
    print(f"stream alone: largest inter-token gap {1e3 * max(alone):.0f} ms, median "
          f"{1e3 * statistics.median(alone):.0f} ms\n")
    print(f"| {'flood (while a stream runs)':<28} | {'outcome':<28} | slowest refusal ms | "
          "RSS peak +MB | RSS held +MB | stream max gap ms |")
    print(f"|{'-' * 30}|{'-' * 30}|{'-' * 20}|{'-' * 14}|{'-' * 14}|{'-' * 19}|")
    for r in rows:
        print(f"| {r['what']:<28} | {r['outcome']:<28} | {r['refusal_ms']:>18.0f} | "
              f"{r['peak_mb']:>12.0f} | {r['held_mb']:>12.0f} | {r['max_gap_ms']:>17.0f} |")


if __name__ == "__main__":
    main()
