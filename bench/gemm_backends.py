"""Compiled decode steps with each choice of GEMM backends, interleaved in one process.

    python -m bench.gemm_backends [--model-dir DIR] [--dtype int8] [--rows 1]
        [--variants max-autotune,CPP,ATEN,cpumesh] [--steps 60] [--threads 2]

One model (tp 1, the embedded SmolLM2 unless --model-dir), one compiled decode graph per variant
(`CompiledDecode.gemms`: "max-autotune" lets inductor time ATen's GEMMs against its C++
template, "CPP" / "ATEN" allow one of them; the shard's own choice is `gemm_backends`;
"cpumesh": every int8 product by cpumesh's int8 kernel, an opaque op), each with its own KV
cache. Every round runs one step of each graph in turn, all fed the first variant's greedy
tokens, so a noisy machine slows them alike; reports median ms per step, steps with NaN logits
and how often the variants' greedy tokens agree. Writes
bench/results/gemm_backends.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

PROMPT = 32  # tokens before the measured steps


def measure(model_dir: Path, dtype: str, rows: int, variants: list[str],
            steps: int) -> dict[str, Any]:
    from bench.interleaved import interleave
    from shard_svc.compiled_gemms import gemm_backends
    from shard_svc.compiled_step import CompiledDecode
    from shard_svc.engine import ShardEngine
    from shard_svc.mesh.communicator import SingleRank
    from tests.compiled_ranks import compilable_model  # as a --compile decode shard builds it

    models = {}  # cpumesh's kernel (its weights blocked) or ATen's weight-only kernels (plain)
    engines, warm = {}, {}
    for name in variants:
        library = "cpumesh" if name == "cpumesh" else "aten" if dtype == "int8" else "auto"
        if library not in models:
            models[library] = compilable_model(model_dir, SingleRank(), dtype, library)
        model = models[library]
        compiled = CompiledDecode(model, buckets=(rows,))
        if name != "cpumesh":
            compiled.gemms = None if name == "max-autotune" else name
        cache = model.new_cache(rows * (PROMPT + steps + 16))
        warm[name] = compiled.warm_up(cache)
        engines[name] = ShardEngine(model, cache, compiled=compiled)
    r = interleave(engines, [PROMPT], rows, steps, model.config.vocab_size)
    return {"model_dir": str(model_dir), "dtype": dtype, "rows": rows, "steps": steps,
            "shard_choice": gemm_backends(model) or "max-autotune",  # (the last model's)
            "load_avg": os.getloadavg()[0], "steps_agreeing": r["steps_agreeing"][0],
            "variants": {name: {"ms_per_step": r["ms_per_step"][name][0],
                                "warm_up_s": warm[name], "nan_steps": r["nan_steps"][name][0]}
                         for name in variants}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, help="default: the embedded SmolLM2")
    p.add_argument("--dtype", default="int8",
                   choices=["float32", "bfloat16", "float16", "int8", "int4"])
    p.add_argument("--rows", type=int, default=1, help="sequences per step (one bucket)")
    p.add_argument("--variants", default="max-autotune,CPP",
                   help="comma-separated: max-autotune, CPP, ATEN, cpumesh (int8 only)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/gemm_backends.json"))
    a = p.parse_args(argv)
    variants = a.variants.split(",")
    if not variants or set(variants) - {"max-autotune", "CPP", "ATEN", "cpumesh"} or a.rows < 1:
        p.error("--variants: max-autotune, CPP, ATEN, cpumesh; --rows >= 1")
    if "cpumesh" in variants and a.dtype != "int8":
        p.error("--variants cpumesh is cpumesh's int8 kernel: --dtype int8 only")
    import torch

    torch.set_num_threads(a.threads)
    model_dir = a.model_dir
    if model_dir is None:
        from model_formats.embedded import default_model_dir
        model_dir = default_model_dir()
    r = measure(model_dir, a.dtype, a.rows, variants, a.steps)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2))
    print(f"{a.dtype}, {a.rows} row(s), {a.steps} interleaved steps, {a.threads} threads "
          f"(the shard's choice: {r['shard_choice']}; load {r['load_avg']:.1f})")
    for name, v in r["variants"].items():
        print(f"{name:>13}: {v['ms_per_step']:7.2f} ms/step, NaN in {v['nan_steps']} steps, "
              f"warm-up {v['warm_up_s']:.0f} s")
    print(f"greedy tokens equal in {r['steps_agreeing']} of {a.steps} steps")


if __name__ == "__main__":
    main()
