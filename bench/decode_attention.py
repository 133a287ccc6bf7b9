"""Compiled decode with the C++ decode attention against gather + SDPA, interleaved in one process.

    python -m bench.decode_attention [--model-dir DIR] [--dtype bfloat16] [--rows 1]
        [--contexts 128,1024,4096] [--steps 30] [--threads 2]

One model (tp 1, the embedded SmolLM2 unless --model-dir), two compiled decode graphs with their
own KV caches: "kernel" reads each history in place (`cpumesh_kernels::decode_attention`, what a
shard takes where it builds), "sdpa" gathers it and calls scaled_dot_product_attention (the
fallback). Each holds `rows` sequences per context length; steps interleave (bench.interleaved).
Reports ms per step at each context, the growth from the first context to each (the decode-speed
issue's target: <= 1.5x from 128 to 4096 tokens) and greedy agreement. Writes
bench/results/decode_attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from bench.shard_steps import batch_sizes  # positive integers, comma-separated


def measure(model_dir: Path, dtype: str, rows: int, contexts: list[int],
            steps: int) -> dict[str, Any]:
    from bench.interleaved import interleave
    from shard_svc.compiled_step import CompiledDecode
    from shard_svc.engine import ShardEngine
    from shard_svc.mesh.communicator import SingleRank
    from tests.compiled_ranks import compilable_model  # as a --compile decode shard builds it

    model = compilable_model(model_dir, SingleRank(), dtype)
    engines, warm, isa = {}, {}, None
    for name in ("sdpa", "kernel"):
        compiled = CompiledDecode(model, buckets=(rows,))
        isa = compiled.attention or isa
        if name == "sdpa":
            compiled.attention = None
        elif not compiled.attention:
            raise SystemExit("the C++ decode attention did not build here (see the log)")
        cache = model.new_cache(rows * (sum(contexts) + len(contexts) * (steps + 16)))
        warm[name] = compiled.warm_up(cache)
        engines[name] = ShardEngine(model, cache, compiled=compiled)
    r = interleave(engines, contexts, rows, steps, model.config.vocab_size)
    ms = r["ms_per_step"]
    return r | {"model_dir": str(model_dir), "dtype": dtype, "isa": isa, "warm_up_s": warm,
                "load_avg": os.getloadavg()[0],
                "growth": {name: [m / v[0] for m in v] for name, v in ms.items()},
                "kernel_over_sdpa": [k / s for k, s in zip(ms["kernel"], ms["sdpa"],
                                                            strict=True)]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, help="default: the embedded SmolLM2")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rows", type=int, default=1, choices=range(1, 257), metavar="1..256",
                   help="sequences per step (one bucket)")
    p.add_argument("--contexts", type=batch_sizes, default=[128, 1024, 4096],
                   help="prompt lengths before the measured steps, comma-separated")
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
    r = measure(model_dir, a.dtype, a.rows, a.contexts, a.steps)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2))
    print(f"{a.dtype}, {a.rows} row(s), {a.steps} interleaved steps per context, {a.threads} "
          f"threads, kernel built for {r['isa']} (load {r['load_avg']:.1f})")
    print("| context | gather + SDPA ms | kernel ms | kernel / SDPA | greedy equal |")
    print("|---|---|---|---|---|")
    for c, n in enumerate(a.contexts):
        print(f"| {n} | {r['ms_per_step']['sdpa'][c]:.2f} | {r['ms_per_step']['kernel'][c]:.2f} "
              f"| {r['kernel_over_sdpa'][c]:.2f} | {r['steps_agreeing'][c]} / {a.steps} |")
    for name in ("sdpa", "kernel"):
        print(f"growth from {a.contexts[0]} tokens ({name}): "
              + ", ".join(f"{n}: {g:.2f}x" for n, g in zip(a.contexts, r["growth"][name],
                                                            strict=True)))


if __name__ == "__main__":
    main()
