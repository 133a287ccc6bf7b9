"""Streaming latency through the router at 1, 4 and 16 concurrent streams, and the router's own
overhead per step, against the bare shard steps measured in the same run.

    python -m bench.router_latency [--model-dir DIR] [--tp 2] [--threads 1] [--tokens 32]
                                   [--levels 1,4,16] [--rounds 2]

Real processes on loopback: a tokenizer, `--tp` SmolLM2 shards and a router (restarted for each
level, so its statistics are per level). At each level, `c` client streams run closed-loop
(each sends `--rounds` greedy requests of ~30 prompt tokens and `--tokens` new tokens, one after
another) and the client measures time to first token and the gaps between token arrivals.

The peer is the floor: the same batch driven straight through the shards' Step RPCs with greedy
top-1 and no router (`bare step`). `ITL / bare` is what the router, the tokenizer and gRPC
streaming add. The router's overhead per step is the engine's time not spent awaiting the shards,
the tokenizer or a release (from its own counters); `router CPU / step` is the router process's
whole CPU time (gRPC threads included) divided by its steps.
Prints a table and writes bench/results/router_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from router_svc.sampling import ShardCandidates, merge
from router_svc.shards import SeqWork, ShardGroup
from tests.procs import Service, free_ports, wait_serving
from tools.client import RouterClient

WARMUP_TOKENS = 4  # one request, one step per token
PROMPTS = [f"Request {i}: write a short paragraph about the history of the number {i}, "
           f"its uses in science and one surprising fact." for i in range(64)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def greedy(parts: list[ShardCandidates]) -> int:
    return merge(parts).token_ids[0]


async def bare_steps(shard_addrs: list[str], prompts: list[list[int]], tokens: int) -> float:
    """Median ms of the decode steps of `prompts` as one batch, straight through the shards."""
    group = ShardGroup(shard_addrs)
    try:
        info = (await group.info_all(10))[0]
        step_id = info.next_step_id + 1
        await group.reset_all(step_id, 10)
        work = [SeqWork(i, tuple(p), True, 1, 0.0) for i, p in enumerate(prompts)]
        times = []
        for n in range(tokens):
            t0 = time.perf_counter()
            result = await group.step_all(step_id, work, 60)
            if n:
                times.append(time.perf_counter() - t0)
            step_id += 1
            work = [SeqWork(i, (greedy(result.candidates[i]),), False, 1, 0.0)
                    for i in range(len(prompts))]
        await group.release_all(list(range(len(prompts))), 10)
        return 1e3 * statistics.median(times)
    finally:
        await group.close()


async def streams(router: str, level: int, rounds: int, tokens: int
                  ) -> tuple[list[float], list[float], float]:
    """TTFTs and inter-token gaps (ms) of `level` closed-loop clients; wall seconds."""
    ttfts: list[float] = []
    gaps: list[float] = []

    async def client(k: int) -> None:
        async with RouterClient(router) as c:
            for r in range(rounds):
                t0, last = time.perf_counter(), None
                async for response in c.generate(PROMPTS[(k * rounds + r) % len(PROMPTS)],
                                                 max_new_tokens=tokens, temperature=0,
                                                 ignore_eos=True, timeout=600):
                    if not response.token_ids:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttfts.append(1e3 * (now - t0))
                    else:
                        gaps.append(1e3 * (now - last))
                    last = now

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(level)))
    return ttfts, gaps, time.perf_counter() - t0


def router_stats(log: Path) -> dict[str, Any]:
    found = re.findall(r"engine stats json: (\{.*\})", log.read_text())
    if not found:
        raise RuntimeError(f"no engine stats in {log}")
    return dict(json.loads(found[-1]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per shard")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/router_latency.json"))
    args = p.parse_args(argv)
    model_dir = args.model_dir
    if model_dir is None:
        from model_formats.embedded import default_model_dir
        model_dir = default_model_dir()
    levels = [int(x) for x in args.levels.split(",")]
    log_dir = Path(tempfile.mkdtemp(prefix="cpumesh-bench-"))
    ports = free_ports(2 + 2 * args.tp)
    tok_addr = f"127.0.0.1:{ports[0]}"
    shard_addrs = [f"127.0.0.1:{p}" for p in ports[2:2 + args.tp]]
    peers = ",".join(f"127.0.0.1:{p}" for p in ports[2 + args.tp:])
    tokenizer = Service("tokenizer", ["-m", "tokenizer_svc", "--model-dir", str(model_dir),
                                      "--listen", tok_addr], log_dir)
    shards = [Service(f"shard{r}", [
        "-m", "shard_svc", "--model-dir", str(model_dir), "--tp-size", str(args.tp),
        "--tp-rank", str(r), "--peers", peers, "--listen", a, "--threads", str(args.threads),
        "--kv-capacity-tokens", "16384"], log_dir) for r, a in enumerate(shard_addrs)]
    rows: list[dict[str, Any]] = []
    try:
        for s in [tokenizer, *shards]:
            s.start()
        wait_serving(tok_addr, tokenizer)
        for s, a in zip(shards, shard_addrs, strict=True):
            wait_serving(a, s, deadline_s=180)
        from tokenizer_svc.tokenizer import Tokenizer
        tok = Tokenizer.from_dir(model_dir)
        for level in levels:
            prompts = [tok.encode(PROMPTS[k]) for k in range(level)]
            bare_ms = asyncio.run(bare_steps(shard_addrs, prompts, args.tokens))
            router_addr = f"127.0.0.1:{free_ports(1)[0]}"
            router = Service(f"router-c{level}", [
                "-m", "router_svc", "--tokenizer", tok_addr, "--shards", ",".join(shard_addrs),
                "--listen", router_addr, "--max-running", "64"], log_dir)
            router.start()
            try:
                wait_serving(router_addr, router)
                asyncio.run(streams(router_addr, 1, 1, WARMUP_TOKENS))
                assert router.proc is not None
                proc = psutil.Process(router.proc.pid)
                cpu0 = sum(proc.cpu_times()[:2])
                ttfts, gaps, wall = asyncio.run(streams(router_addr, level, args.rounds,
                                                        args.tokens))
                cpu = sum(proc.cpu_times()[:2]) - cpu0
            finally:
                router.stop()
            stats = router_stats(router.log_path)
            rows.append({
                "streams": level, "requests": len(ttfts), "wall_s": wall,
                "ttft_ms_p50": pct(ttfts, 0.5), "ttft_ms_p90": pct(ttfts, 0.9),
                "itl_ms_p50": pct(gaps, 0.5), "itl_ms_p90": pct(gaps, 0.9),
                "bare_step_ms_p50": bare_ms, "itl_over_bare": pct(gaps, 0.5) / bare_ms,
                "tokens_per_s": level * args.rounds * args.tokens / wall,
                "router_cpu_ms_per_step": 1e3 * cpu / (stats["steps"] - WARMUP_TOKENS),
                "router": stats})
            print_row(rows[-1])
    finally:
        for s in [*shards, tokenizer]:
            s.stop()
    result = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                          "cpus": psutil.cpu_count()},
              "model_dir": str(model_dir), "tp": args.tp, "threads": args.threads,
              "tokens": args.tokens, "rounds": args.rounds, "rows": rows, "logs": str(log_dir)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}; logs in {log_dir}")


HEADER = False


def print_row(r: dict[str, Any]) -> None:
    global HEADER
    if not HEADER:
        print(f"{'streams':>7} {'TTFT p50/p90 ms':>16} {'ITL p50/p90 ms':>15} {'bare step':>9} "
              f"{'ITL/bare':>8} {'tok/s':>6} {'overhead/step ms':>22} {'tokenizer':>9} "
              f"{'CPU/step':>8} {'batch':>5}")
        print(f"{'':>7} {'':>16} {'':>15} {'ms':>9} {'':>8} {'':>6} {'mean / p50 / p99':>22} "
              f"{'wait ms':>9} {'ms':>8} {'mean':>5}")
        HEADER = True
    s = r["router"]
    print(f"{r['streams']:>7} {r['ttft_ms_p50']:>7.1f}/{r['ttft_ms_p90']:<8.1f} "
          f"{r['itl_ms_p50']:>6.1f}/{r['itl_ms_p90']:<8.1f} {r['bare_step_ms_p50']:>9.1f} "
          f"{r['itl_over_bare']:>8.2f} {r['tokens_per_s']:>6.1f} "
          f"{s['overhead_ms']:>6.3f} / {s['overhead_p50_ms']:.3f} / {s['overhead_p99_ms']:.3f} "
          f"{s['wait_ms'].get('tokenizer', 0.0):>9.3f} {r['router_cpu_ms_per_step']:>8.2f} "
          f"{s['mean_batch']:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
