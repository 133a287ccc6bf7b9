"""Decode with the C++ decode attention against SDPA, interleaved in one process.

    python -m bench.decode_attention [--model-dir DIR] [--dtype bfloat16] [--rows 1]
        [--contexts 128,1024,4096] [--compile decode|off] [--steps 30] [--threads 2]

One model (tp 1, the embedded SmolLM2 unless --model-dir), twice, each with its own KV cache:
"kernel" reads each history in place (`cpumesh_kernels::decode_attention`, what a shard takes
where it builds), "sdpa" the fallback: compiled graphs gather each history for
scaled_dot_product_attention; eager steps (--compile off) give it one padded gather for short
batches, views of the cache per sequence otherwise. Each holds `rows` sequences per context
length; steps interleave (bench.interleaved). Reports ms per step at each context, the growth
from the first context to each (the decode-speed issue's target: <= 1.5x from 128 to 4096
tokens) and greedy agreement. Writes bench/results/decode_attention.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.shard_steps import batch_sizes  # positive integers, comma-separated
from shard_svc import decode_attention


def measure(model_dir: Path, dtype: str, rows: int, contexts: list[int], steps: int,
            compile: str = "decode") -> dict[str, Any]:
    from bench.interleaved import interleave
    from shard_svc.engine import ShardEngine
    from shard_svc.mesh.communicator import SingleRank
    from tests.compiled_ranks import compilable_model  # as a --compile decode shard builds it

    engines, warm, isa = {}, {}, None
    capacity = rows * (sum(contexts) + len(contexts) * (steps + 16))
    for name in ("sdpa", "kernel"):
        t0 = time.monotonic()
        if compile == "decode":
            from shard_svc.compiled_step import CompiledDecode

            model = compilable_model(model_dir, SingleRank(), dtype)
            compiled = CompiledDecode(model, buckets=(rows,))
            isa, kernel = compiled.attention or isa, compiled.attention
            if name == "sdpa":
                compiled.attention = None
            cache = model.new_cache(capacity)
            compiled.warm_up(cache)
            engines[name] = ShardEngine(model, cache, compiled=compiled)
        else:  # eager, the kernels a shard chooses by default
            model = eager_model(model_dir, dtype)
            isa, kernel = decode_attention.load(model.config.head_dim), model.slot_decode
            if name == "sdpa":
                model.slot_decode = None
            engines[name] = ShardEngine(model, model.new_cache(capacity))
        if name == "kernel" and not kernel:
            raise SystemExit("the C++ decode attention did not build here (see the log)")
        warm[name] = time.monotonic() - t0
    r = interleave(engines, contexts, rows, steps, model.config.vocab_size)
    ms = r["ms_per_step"]
    return r | {"model_dir": str(model_dir), "dtype": dtype, "compile": compile, "isa": isa,
                "start_s": warm, "load_avg": os.getloadavg()[0],
                "growth": {name: [m / v[0] for m in v] for name, v in ms.items()},
                "kernel_over_sdpa": [k / s for k, s in zip(ms["kernel"], ms["sdpa"],
                                                            strict=True)]}


def eager_model(model_dir: Path, dtype: str) -> Any:
    import torch

    from model_formats.checkpoint import load_model_config
    from shard_svc.mesh.communicator import SingleRank
    from shard_svc.model import ShardModel
    from shard_svc.sharding import plan_shard
    from shard_svc.weights import load_shard_weights

    config = load_model_config(model_dir)
    plan = plan_shard(config, 0, 1)
    return ShardModel(config, plan, load_shard_weights(model_dir, config, plan,
                                                       getattr(torch, dtype)), SingleRank())


def table(r: dict[str, Any]) -> list[str]:
    lines = ["| context | gather + SDPA ms | kernel ms | kernel / SDPA | greedy equal |",
             "|---|---|---|---|---|"]
    for c, n in enumerate(r["contexts"]):
        lines.append(f"| {n} | {r['ms_per_step']['sdpa'][c]:.2f} | "
                     f"{r['ms_per_step']['kernel'][c]:.2f} | {r['kernel_over_sdpa'][c]:.2f} | "
                     f"{r['steps_agreeing'][c]} / {r['steps']} |")
    for name in ("sdpa", "kernel"):
        lines.append(f"\ngrowth from {r['contexts'][0]} tokens ({name}): " + ", ".join(
            f"{n}: {g:.2f}x" for n, g in zip(r["contexts"], r["growth"][name], strict=True)))
    return lines


def section(r: dict[str, Any]) -> list[str]:
    """The BENCHMARKS.md section for bench/results/decode_attention.json."""
    return ["## Decode attention read in place (the decode-speed issue, 4k context)", "",
            f"{Path(r['model_dir']).name}, {r['dtype']}, --compile {r.get('compile', 'decode')},"
            f" {r['rows']} row(s), {r['steps']} steps per context interleaved in one process "
            f"(bench.interleaved), C++ kernel built for {r['isa']}, load {r['load_avg']:.1f}. "
            "*gather + SDPA*: the path before the kernel (and its fallback).", "", *table(r), "",
            "Command: `python -m bench.decode_attention`", ""]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, help="default: the embedded SmolLM2")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rows", type=int, default=1, choices=range(1, 257), metavar="1..256",
                   help="sequences per step (one bucket)")
    p.add_argument("--contexts", type=batch_sizes, default=[128, 1024, 4096],
                   help="prompt lengths before the measured steps, comma-separated")
    p.add_argument("--compile", default="decode", choices=["decode", "off"],
                   help="decode: compiled graphs (as --compile decode); off: eager steps")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/decode_attention.json"))
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    model_dir = a.model_dir
    if model_dir is None:
        from model_formats.embedded import default_model_dir
        model_dir = default_model_dir()
    r = measure(model_dir, a.dtype, a.rows, a.contexts, a.steps, a.compile)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2))
    print(f"{a.dtype}, --compile {a.compile}, {a.rows} row(s), {a.steps} interleaved steps per "
          f"context, {a.threads} "
          f"threads, kernel built for {r['isa']} (load {r['load_avg']:.1f})")
    print("\n".join(table(r)))


if __name__ == "__main__":
    main()
