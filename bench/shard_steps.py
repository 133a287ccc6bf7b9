"""Shard step time for SmolLM2, split into compute and allreduce wait, at tp 1 and tp 2.

    python -m bench.shard_steps [--model-dir DIR] [--steps 32] [--cores 2] [--dtype D]
                                [--batches 1,8] [--compile decode]

tp 1 runs one shard process with all cores; tp 2 runs two processes with one core each, joined
by the ZeroMQ mesh on loopback. A driver (like the router, but greedy only) sends the same Step to
every shard at once. Reported per decode step, medians: wall time seen by the driver, the
shards' compute and allreduce wait (mean over ranks), and the rest (gRPC, driver, skew).
`--compile decode`: the shards compile their decode step for the measured batch (compile time
before SERVING, not measured). Writes bench/results/shard_steps.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from services.pb.cpumesh.v1 import shard_pb2
from tests.service.test_shard_service import ShardGroup, shard_group


def run(model_dir: Path, tp: int, batch: int, steps: int, cores: int,
        dtype: str = "float32", compile: str = "off") -> dict[str, Any]:
    threads = max(1, cores // tp)
    extra: tuple[str, ...] = ("--threads", str(threads), "--kv-capacity-tokens", "8192",
                              "--dtype", dtype)
    if compile == "decode":
        extra += ("--compile", "decode", "--compile-rows", str(batch), "--mesh-timeout", "900")
    with tempfile.TemporaryDirectory() as logs, \
            shard_group(model_dir, tp, Path(logs), extra=extra,
                        serving_deadline_s=900) as (_, addrs):
        group = ShardGroup(addrs)
        r = measure(group, batch, steps)
        group.close()
    return {"tp": tp, "batch": batch, "threads_per_shard": threads, "dtype": dtype,
            "compile": compile, **r}


def measure(group: ShardGroup, batch: int, steps: int) -> dict[str, float]:
    """Prefill `batch` sequences, time `steps` decode steps, release them; medians in ms."""
    step_id = group.call("Info", shard_pb2.ShardInfoRequest())[0].next_step_id
    prompt = list(range(100, 132))  # valid in any vocabulary of 132+ tokens
    chosen = group.step(shard_pb2.StepRequest(step_id=step_id, prefill=[
        shard_pb2.PrefillSeq(seq_id=i, token_ids=prompt, top_k=1) for i in range(batch)]))
    walls, compute, allreduce = [], [], []
    for s in range(steps):
        request = shard_pb2.StepRequest(step_id=step_id + 1 + s, extend=[
            shard_pb2.ExtendSeq(seq_id=i, token_id=chosen[i], top_k=1) for i in range(batch)])
        t0 = time.perf_counter()
        responses = group.call("Step", request)
        walls.append(time.perf_counter() - t0)
        compute.append(statistics.mean(r.compute_s for r in responses))
        allreduce.append(statistics.mean(r.allreduce_s for r in responses))
        chosen = {r.seq_id: r.token_ids[0] for r in responses[0].results}  # rank 0's pick
    group.call("Release", shard_pb2.ReleaseRequest(seq_ids=list(range(batch))))
    wall, comp, ar = (statistics.median(x) * 1e3 for x in (walls, compute, allreduce))
    return {"wall_ms": wall, "compute_ms": comp, "allreduce_ms": ar,
            "other_ms": wall - comp - ar}


def batch_sizes(text: str) -> list[int]:
    """--batches: positive integers, comma-separated (argparse reports anything else)."""
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: positive integers, comma-separated")
    return sizes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--dtype", default="float32",
                   choices=["float32", "bfloat16", "float16", "int8", "int4"])
    p.add_argument("--batches", type=batch_sizes, default="1,8",
                   help="batch sizes, comma-separated")
    p.add_argument("--compile", default="off", choices=["off", "decode"])
    p.add_argument("--out", type=Path, default=Path("bench/results/shard_steps.json"))
    args = p.parse_args(argv)
    model_dir = args.model_dir
    if model_dir is None:
        from model_formats.embedded import default_model_dir
        model_dir = default_model_dir()
    rows = [run(model_dir, tp, b, args.steps, args.cores, args.dtype, args.compile)
            for tp in (1, 2) for b in args.batches]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model_dir": str(model_dir), "rows": rows}, indent=2))
    print(f"decode step, {args.steps} steps, medians (ms); {args.cores} cores in all")
    print(f"{'tp':>3}{'batch':>6}{'thr/shard':>10}{'wall':>8}{'compute':>9}{'allreduce':>10}"
          f"{'other':>7}{'ms/token':>9}")
    for r in rows:
        print(f"{r['tp']:>3}{r['batch']:>6}{r['threads_per_shard']:>10}{r['wall_ms']:>8.1f}"
              f"{r['compute_ms']:>9.1f}{r['allreduce_ms']:>10.2f}{r['other_ms']:>7.1f}"
              f"{r['wall_ms'] / r['batch']:>9.2f}")


if __name__ == "__main__":
    main()
