"""Decode ms/step eager against compiled (`--compile decode`), in one process, steps interleaved.

    python -m bench.compiled_speed [--dtypes float32 bfloat16] [--batches 1 8] [--threads 2]
        [--steps 32] [--model-dir DIR]

The embedded SmolLM2 (or --model-dir) per dtype, tp 1, loaded twice: the eager engine's with
the kernels a default shard chooses at start (packed oneDNN weights where they win), the
compiled engine's as a shard with `--compile decode` chooses them (plain kernels: the weights are
frozen into the graph). Each engine has its own KV cache and both are fed the same tokens.
Every round runs one decode step of each engine in turn, so a
machine shared with other jobs slows them alike; the medians are reported with the load average
before and after, the compile (warm-up) time of every bucket, and the ratio to eager.
llama.cpp (F32 / F16 of the same weights) runs in the same invocation when its environment
(`make bench-env`, build/bench-venv) exists. Writes bench/results/compiled_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.machine import BENCH_PYTHON

RESULTS = Path("bench/results/compiled_speed.json")
PEER = {"float32": "F32", "bfloat16": "F16", "float16": "F16"}


def measure(model_dir: Path, dtype: str, batches: list[int], steps: int,
            prompt: int) -> list[dict[str, Any]]:
    import torch

    from model_formats.checkpoint import load_model_config
    from shard_svc.compiled_step import CompiledDecode
    from shard_svc.engine import SeqWork, ShardEngine
    from shard_svc.kernels import choose_kernels
    from shard_svc.mesh.communicator import SingleRank
    from shard_svc.model import ShardModel
    from shard_svc.sharding import plan_shard
    from shard_svc.weights import load_shard_weights

    config = load_model_config(model_dir)
    plan = plan_shard(config, 0, 1)
    model = ShardModel(config, plan, load_shard_weights(model_dir, config, plan,
                                                        getattr(torch, dtype)), SingleRank())
    weights = load_shard_weights(model_dir, config, plan, getattr(torch, dtype))
    plain = ShardModel(config, plan, weights, SingleRank(), choose_kernels(
        "auto", weights.embed.dtype, [w.gate_up for w in weights.layers], packing=False))
    tokens = max(batches) * (prompt + steps + 16)
    engines = {"eager": ShardEngine(model, model.new_cache(tokens))}
    compiled = CompiledDecode(plain, buckets=tuple(sorted(set(batches))))
    cache = plain.new_cache(tokens)
    warm = {"compiled": compiled.warm_up(cache)}
    engines["compiled"] = ShardEngine(plain, cache, compiled=compiled)
    rows = []
    for batch in batches:
        load_before = os.getloadavg()[0]
        ids = tuple(range(100, 100 + prompt))
        chosen = {}
        for name, e in engines.items():
            e.reset()
            out = e.step(e.next_step_id, [SeqWork(s, ids, True) for s in range(batch)])
            chosen[name] = [r.token_ids[0] for r in out.results]
        times: dict[str, list[float]] = {name: [] for name in engines}
        agree = 0
        for _ in range(steps):
            feed = chosen["eager"]  # every engine fed eager's greedy tokens
            for name, e in engines.items():
                t0 = time.perf_counter()
                out = e.step(e.next_step_id, [SeqWork(s, (feed[s],), False)
                                              for s in range(batch)])
                times[name].append((time.perf_counter() - t0) * 1e3)
                chosen[name] = [r.token_ids[0] for r in out.results]
            agree += chosen["compiled"] == chosen["eager"]
        med = {name: statistics.median(t) for name, t in times.items()}
        row = {"dtype": dtype, "batch": batch, "ms_per_step": med,
               "ratio_to_eager": {n: med[n] / med["eager"] for n in med},
               "greedy_agreement": agree / steps, "warm_up_s": warm,
               "kernels": model.kernels.describe(), "compiled_kernels": plain.kernels.describe(),
               "compiled_steps": compiled.steps,
               "load_average": [load_before, os.getloadavg()[0]]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def peer_rows(model_dir: Path, dtypes: list[str], batches: list[int], threads: int,
              steps: int, prompt: int) -> list[dict[str, Any]]:
    from bench.gguf_export import export_gguf
    from bench.model_level import run_peer

    cache = Path("build/bench-models")
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for dtype in dtypes:
        gguf = export_gguf(model_dir, cache / f"{model_dir.name}-{PEER[dtype]}.gguf", PEER[dtype])
        for batch in batches:
            r = run_peer(gguf, batch, prompt, steps, threads, 3)
            out.append({"dtype": dtype, "batch": batch, "peer": f"llama.cpp {PEER[dtype]}",
                        "ms_per_step": statistics.median(r["decode_step_ms"])})
            print(json.dumps(out[-1]), flush=True)
    return out


def table(rows: list[dict[str, Any]], peers: list[dict[str, Any]]) -> str:
    names = list(rows[0]["ms_per_step"])
    out = ["| dtype | batch | " + " | ".join(f"{n} ms/step" for n in names)
           + " | llama.cpp ms/step | load avg |", "|---" * (len(names) + 4) + "|"]
    for r in rows:
        peer = next((p["ms_per_step"] for p in peers
                     if p["dtype"] == r["dtype"] and p["batch"] == r["batch"]), None)
        cells = [f"{r['ms_per_step'][n]:.1f}" + ("" if n == "eager" else
                                                 f" ({r['ratio_to_eager'][n]:.2f}x)")
                 for n in names]
        out.append(f"| {r['dtype']} | {r['batch']} | " + " | ".join(cells)
                   + f" | {'-' if peer is None else f'{peer:.1f}'} | "
                   + "-".join(f"{x:.1f}" for x in r["load_average"]) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt", type=int, default=32)
    a = p.parse_args(argv)
    import torch

    from model_formats.embedded import default_model_dir

    torch.set_num_threads(a.threads)
    model_dir = a.model_dir or default_model_dir()
    rows = [r for d in a.dtypes
            for r in measure(model_dir, d, a.batches, a.steps, a.prompt)]
    peers = (peer_rows(model_dir, a.dtypes, a.batches, a.threads, a.steps, a.prompt)
             if BENCH_PYTHON.exists() else [])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": model_dir.name, "threads": a.threads,
                                   "rows": rows, "llama.cpp": peers}, indent=1))
    print(table(rows, peers))


if __name__ == "__main__":
    main()
