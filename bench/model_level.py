"""Model-level prefill and decode of one system, one model, one batch size, in this process.

    python -m bench.model_level --system cpumesh|transformers --model-dir DIR --batch 8 \
        --prompt 32 --tokens 32 --threads 2 --repeats 3

Prints one JSON object: per repeat, the prefill time of `batch` prompts of `prompt` token ids
(100, 101, ...) and the median decode step (one token for each of the `batch` sequences),
after one unreported warm-up repeat. cpumesh runs its shard engine at tp 1 (the code a shard
runs, without gRPC); transformers runs `generate` (greedy), whose decode step is isolated as
(generate(n) - generate(1)) / (n - 1), and a forward with `logits_to_keep=1` for prefill.
llama.cpp runs in the bench environment (`bench/llamacpp_peer.py`), called by `run_peer`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import BENCH_PYTHON


def cpumesh(model_dir: Path, batch: int, prompt: int, tokens: int, repeats: int,
            dtype: str = "float32", kernels: str = "auto", compile: str = "off"
            ) -> dict[str, Any]:
    import torch

    from model_formats.checkpoint import load_model_config
    from shard_svc import heap
    from shard_svc.engine import SeqWork, ShardEngine
    from shard_svc.mesh.communicator import SingleRank
    from shard_svc.model import ShardModel
    from shard_svc.sharding import plan_shard
    from shard_svc.weights import load_shard_weights

    config = load_model_config(model_dir)
    from shard_svc.kernels import choose_kernels

    plan = plan_shard(config, 0, 1)
    weights = load_shard_weights(model_dir, config, plan, getattr(torch, dtype))
    plan_k = choose_kernels(kernels, weights.embed.dtype, [x.gate_up for x in weights.layers],
                            packing=compile != "decode")  # as the shard chooses them
    model = ShardModel(config, plan, weights, SingleRank(), plan_k)
    del weights
    cache = model.new_cache(batch * (prompt + tokens + 16))
    compiled, warm_s = None, 0.0
    if compile == "decode":
        from shard_svc.compiled_step import CompiledDecode

        compiled = CompiledDecode(model, buckets=(batch,))  # only the bucket measured
        warm_s = compiled.warm_up(cache)
    engine = ShardEngine(model, cache, max_context=prompt + tokens + 16, compiled=compiled)
    heap.settle()  # as the shard does when it starts serving
    ids = tuple(range(100, 100 + prompt))
    prefill_ms, decode_ms = [], []
    for r in range(repeats + 1):
        engine.reset()
        t0 = time.perf_counter()
        out = engine.step(engine.next_step_id, [SeqWork(s, ids, True) for s in range(batch)])
        t_prefill = time.perf_counter() - t0
        chosen = [res.token_ids[0] for res in out.results]
        steps = []
        for _ in range(tokens - 1):
            t0 = time.perf_counter()
            out = engine.step(engine.next_step_id,
                              [SeqWork(s, (chosen[s],), False) for s in range(batch)])
            steps.append(time.perf_counter() - t0)
            chosen = [res.token_ids[0] for res in out.results]
        if r:
            prefill_ms.append(t_prefill * 1e3)
            decode_ms.append(statistics.median(steps) * 1e3)
    return {"prefill_ms": prefill_ms, "decode_step_ms": decode_ms,
            "kernels": plan_k.describe(), "compile": compile,
            "warm_up_s": warm_s, "graphs": compiled.graphs if compiled else 0}


def transformers(model_dir: Path, batch: int, prompt: int, tokens: int,
                 repeats: int, dtype: str = "float32") -> dict[str, list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    ids = torch.arange(100, 100 + prompt).repeat(batch, 1)  # [B, P]
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    def forward() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids, attention_mask=mask, logits_to_keep=1)
        return time.perf_counter() - t0

    prefill_ms, decode_ms = [], []
    for r in range(repeats + 1):
        t_prefill = forward()
        step = (generate(tokens) - generate(1)) / (tokens - 1)
        if r:
            prefill_ms.append(t_prefill * 1e3)
            decode_ms.append(step * 1e3)
    return {"prefill_ms": prefill_ms, "decode_step_ms": decode_ms}


def run_system(system: str, model_dir: Path, batch: int, prompt: int, tokens: int,
               threads: int, repeats: int, dtype: str = "float32",
               compile: str = "off") -> dict[str, Any]:
    """One measurement in a fresh process (clean memory and thread settings; cpumesh's with the
    environment `cpumesh shard` sets for its libraries)."""
    from services.cli import LIBRARY_ENVIRONMENT

    cmd = [sys.executable, "-m", "bench.model_level", "--system", system, "--model-dir",
           str(model_dir), "--batch", str(batch), "--prompt", str(prompt), "--tokens",
           str(tokens), "--threads", str(threads), "--repeats", str(repeats), "--dtype", dtype]
    cmd += ["--compile", compile] if compile != "off" else []
    env = LIBRARY_ENVIRONMENT["shard"] if system == "cpumesh" else {}
    return _json_of(cmd, {**env, **os.environ})  # (an operator's own setting wins)


def run_peer(gguf: Path, batch: int, prompt: int, tokens: int, threads: int,
             repeats: int) -> dict[str, Any]:
    cmd = [str(BENCH_PYTHON), "bench/llamacpp_peer.py", "--gguf", str(gguf), "--batch",
           str(batch), "--prompt", str(prompt), "--tokens", str(tokens), "--threads",
           str(threads), "--repeats", str(repeats)]
    return _json_of(cmd)


def _json_of(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["command"] = " ".join(cmd)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", choices=["cpumesh", "transformers"], required=True)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32",
                   choices=["float32", "bfloat16", "float16", "int8", "int4"])
    p.add_argument("--kernels", default="auto", help="cpumesh only: shard_svc.kernels library")
    p.add_argument("--compile", default="off", choices=["off", "decode"],
                   help="cpumesh only: decode steps compiled (shard_svc.compiled_step)")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.system == "cpumesh":
        result = cpumesh(a.model_dir, a.batch, a.prompt, a.tokens, a.repeats, a.dtype, a.kernels,
                         a.compile)
    else:
        result = transformers(a.model_dir, a.batch, a.prompt, a.tokens, a.repeats, a.dtype)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
