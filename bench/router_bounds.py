"""The router's bounds before work, against a real router process (issue 16, items 3 and 5).

    python -m bench.router_bounds [--model-dir DIR] [--max-waiting 8] [--big-mb 60] [--only-burst]
                                  [--client-procs 4] [--out bench/results/router_bounds.json]

Real processes on loopback: a tokenizer, one SmolLM2 shard and a router with its defaults but
`--max-waiting` (and `--http-listen`). Measured from the client:

* bursts of 4 x max-waiting concurrent requests: how many are refused (RESOURCE_EXHAUSTED), how
  long each refusal took (median, p99, max, from its call's start to its status), and that the
  admitted ones complete; against the same bursts to a bare grpc.aio server that refuses every
  call at once (the floor: gRPC's own cost per call in Python, client and server). Twice: from
  one asyncio client process (as first measured; its own loop is most of what it measures), and
  from `--client-procs` processes of synchronous C-core clients in threads (bench.burst_client);
  with the latter also the router's own side, `cpumesh_refusal_seconds` from its /metrics (from
  the handler's start to the status sent, bucket bounds), and the load average;
* one over-long prompt (300 kB) at a time: the refusal's latency, for comparison;
* a chat of 1,000,000 empty messages (serialized beforehand, ~8 MB): the refusal's latency;
* six concurrent oversized prompts while a greedy stream runs: over gRPC at `--big-mb` MB (over
  `--max-request-bytes`) and at 12 MB (under it, over `--max-prompt-bytes`), and over HTTP at
  `--big-mb` MB: their outcomes, the router's RSS growth (peak, and held 1 s after), and the
  stream's largest inter-token gap (the stream runs in a process of its own), against the same
  stream alone. Refusal times of the flood include sending the bytes.
Prints a table and writes `--out` (JSON); timings are this machine's, with every process
sharing its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import statistics
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import psutil

from bench.router_burst import (
    BURST_ROUNDS,
    burst,
    burst_floor,
    process_bursts,
    raw_generate,
    report,
)
from tests.procs import Service, free_ports, wait_serving
from tools.client import RouterClient, generate_request

MB = 1024 * 1024
STREAM_TOKENS = 48


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
    p.add_argument("--client-procs", type=int, default=4,
                   help="processes of the synchronous burst client")
    p.add_argument("--out", type=Path, default=Path("bench/results/router_bounds.json"))
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
        procs = process_bursts(router, f"http://{http}", 4 * args.max_waiting,
                               args.client_procs)
    finally:
        for s in reversed(services):
            s.stop()
    print(f"\nrouter bounds (SmolLM2, tp 1; router defaults, --max-waiting {args.max_waiting}; "
          f"logs in {log_dir})\n")
    print("\n".join(report(b, "one asyncio client")))
    print("\n".join(report(procs, f"{args.client_procs} processes of sync clients")))
    result: dict[str, object] = {"max_waiting": args.max_waiting, "rounds": BURST_ROUNDS,
                                 "asyncio_client": b, "process_clients": procs}
    if not args.only_burst:
        result.update(chat_ms=chat_ms, floods=rows, stream_alone_max_gap_ms=1e3 * max(alone))
    args.out.write_text(json.dumps(result, indent=1))
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
