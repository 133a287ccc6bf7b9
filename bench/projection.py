"""The Qwen2-72B projection at a precision cpumesh serves, its bandwidth fraction measured in
one process.

    python -m bench.projection [--dtype int8] [--model-dir build/bench-models/llama-1b-random]
        [--repeats 5] [--steps 30] [--threads 2] [--compile decode|off] [--probe-mib 512]
        [--out bench/results/projection_int8.json]

bench.multihost.project takes the paper's hardware as assumed (node bandwidth, link, 4 nodes)
and three measured figures: the fraction of a machine's read bandwidth a decode step achieves,
the allreduce's software cost per call and the step's overhead (the last two from the tp-2 runs
of bench/results/tp_scaling.json, as the projection section of BENCHMARKS.md). This machine's
bandwidth moves between processes and over minutes, so the fraction is measured here in one
process, repeat by repeat: a read of a huge-page array (where a shard keeps its weights;
torch's `sum`, the best of 3) before and after a run of tp-1 decode steps (`--compile decode`
by default, as bench.precision_ratio builds them); fraction = the step's weight bytes over its
median time, over the mean of the two reads' GB/s. The weights a step reads are the layers'
matrices and the LM head, at the bytes the shard holds them in (int8 in groups of 32: 1.125 a
weight); the projection's hidden vectors travel at the activations' width (float32 for int8
weights). Prints Markdown; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench import multihost
from bench.precision_ratio import DEFAULT_MODEL, engine, positive


def probe_gbs(probe: torch.Tensor) -> float:
    """Best of 3 reads of `probe` (a huge-page float32 array), GB/s."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        probe.sum()
        times.append(time.perf_counter() - t0)
    return probe.nbytes / min(times) / 1e9


def step_matrices(weights: Any) -> list[Any]:
    """Every matrix a decode step reads: the layers' and the LM head (not the embedding
    table, of which a step reads one row per token)."""
    return [*(m for layer in weights.layers
              for m in (layer.qkv, layer.wo, layer.gate_up, layer.w_down)), weights.lm_head]


def measure(model_dir: Path, dtype: str, repeats: int, steps: int, compile: str = "decode",
            probe_mib: int = 512) -> dict[str, Any]:
    from bench.interleaved import interleave
    from shard_svc import huge_pages

    e = engine(model_dir, dtype, 1, 32 + steps + 16, compile)
    matrices = step_matrices(e.model.w)
    nbytes = sum(m.nbytes for m in matrices)
    probe = huge_pages.zeros(((probe_mib << 20) // 4,), torch.float32)
    vocab = e.model.config.vocab_size
    rows = []
    for _ in range(repeats):
        before = probe_gbs(probe)
        e.reset()
        ms = statistics.median(interleave({dtype: e}, [32], 1, steps, vocab)["ms_per_step"][dtype])
        after = probe_gbs(probe)
        step_gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append({"ms_per_step": ms, "step_gbs": step_gbs, "read_gbs": [before, after],
                     "fraction": step_gbs / statistics.mean([before, after])})
    return {"model_dir": str(model_dir), "dtype": dtype, "compile": compile,
            "step_weight_bytes": nbytes,
            "params_per_step": sum(m.shape[0] * m.shape[1] for m in matrices),
            "activation_bytes": e.model.dtype.itemsize, "repeats": rows}


def project(r: dict[str, Any], tp: dict[str, Any]) -> dict[str, Any]:
    """The projection at the median fraction (never above 1) with the tp-2 figures of the
    1B-shaped model (bench/results/tp_scaling.json)."""
    t2 = next(x for x in tp["rows"] if x["model"] == "llama-1b-random" and x["tp"] == 2
              and x["batch"] == 1)
    fraction = min(1.0, statistics.median(x["fraction"] for x in r["repeats"]))
    params = r["params_per_step"]
    assumed = {**multihost.ASSUMED, "weight_bytes": r["step_weight_bytes"] / params,
               "activation_bytes": r["activation_bytes"]}
    return multihost.project(fraction, t2["allreduce_ms"] / (2 * t2["layers"]), t2["other_ms"],
                             assumed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="int8", choices=("int8", "int4", "bfloat16", "float32"))
    p.add_argument("--repeats", type=positive, default=5)
    p.add_argument("--steps", type=positive, default=30)
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--compile", default="decode", choices=("decode", "off"))
    p.add_argument("--probe-mib", type=positive, default=512,
                   help="the read probe's array (far larger than the caches)")
    p.add_argument("--out", type=Path, default=Path("bench/results/projection_int8.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not (a.model_dir / "config.json").exists():
        p.error(f"no model at {a.model_dir} (make bench builds build/bench-models)")
    r = measure(a.model_dir, a.dtype, a.repeats, a.steps, a.compile, a.probe_mib)
    r["projection"] = project(r, json.loads(Path("bench/results/tp_scaling.json").read_text()))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2))
    print("\n".join(section(r)))


def section(r: dict[str, Any]) -> list[str]:
    p = r["projection"]
    a = p["assumed"]
    lines = [f"{Path(r['model_dir']).name} at {r['dtype']} ({a['weight_bytes']:.3f} bytes a "
             f"weight, {r['step_weight_bytes'] / 1e9:.2f} GB a step), tp 1, --compile "
             f"{r['compile']}; each repeat: huge-page read GB/s before and after, the step's "
             "median:", "",
             "| repeat | ms/step | step GB/s | read GB/s (before / after) | fraction |",
             "|---|---|---|---|---|"]
    for k, x in enumerate(r["repeats"], 1):
        lines.append(f"| {k} | {x['ms_per_step']:.1f} | {x['step_gbs']:.1f} | "
                     f"{x['read_gbs'][0]:.1f} / {x['read_gbs'][1]:.1f} | {x['fraction']:.2f} |")
    lines += ["", f"Qwen2-72B at {a['weight_bytes']:.3f} bytes a weight, {a['nodes']} nodes of "
              f"{a['node_read_gbs']:.0f} GB/s at fraction "
              f"{p['measured']['achieved_fraction']:.2f}: weights {p['compute_ms']:.1f} ms + "
              f"{p['allreduce_calls']} allreduces {p['allreduce_ms']:.1f} ms + overhead "
              f"{p['overhead_ms']:.1f} ms = **{p['total_ms']:.0f} ms/token** against the "
              f"paper's {p['paper_ms']:.0f} "
              f"({'PASS' if p['total_ms'] <= p['paper_ms'] else 'MISS'} <= {p['paper_ms']:.0f})"]
    return lines


if __name__ == "__main__":
    main()
