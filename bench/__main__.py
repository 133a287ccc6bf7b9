"""The benchmark suite: one command runs every stage, saves JSON, then writes the report.

    python -m bench            # make bench: everything, BENCHMARKS.md and bench/plots/
    python -m bench --quick    # make bench-quick: a ~5-minute subset into build/bench-quick/

Stages: machine (CPU, versions, read bandwidth), model level (prefill and decode of cpumesh tp 1,
transformers and llama.cpp), tp scaling (shard step split), multi-host emulation, service-level
load test, then `bench.report`. llama.cpp peers run only where llama-cpp-python is installed in
build/bench-venv (`make bench-env`); otherwise they are skipped and the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import machine, model_level, multihost, report, serving, shard_steps
from bench.gguf_export import export_gguf
from bench.models import BenchModel, llama_1b, smollm2


@dataclass(frozen=True)
class Plan:
    out_dir: Path  # BENCHMARKS.md here, JSON in results/, PNGs in plots/
    models: tuple[BenchModel, ...]
    serving_model: BenchModel
    batches: tuple[int, ...] = (1, 8)
    prompt: int = 32
    tokens: int = 32
    repeats: int = 3
    gguf_types: tuple[str, ...] = ("F32",)
    tp_steps: int = 32
    users: tuple[int, ...] = (1, 4, 16, 64)
    serving_requests: int = 200
    serving_duration_s: float = 60.0
    serving_output: str = "16:48"
    multihost_rates: tuple[str, ...] = ("10gbit", "25gbit")
    multihost_steps: int = 32
    multihost_delays_us: tuple[float, ...] = multihost.DELAYS_US
    multihost_baseline: bool = True  # the loopback group (tcp) beside the emulated links
    cache: Path = Path.home() / ".cache" / "cpumesh" / "bench"
    command: str = "make bench"
    peers: bool = True  # llama.cpp rows, where llama-cpp-python is installed


def full_plan(cache: Path, with_1b: bool = True) -> Plan:
    models = (smollm2(), llama_1b(cache)) if with_1b else (smollm2(),)
    return Plan(Path("."), models, smollm2(), gguf_types=("F32", "F16"), cache=cache)


def quick_plan(cache: Path) -> Plan:
    return Plan(Path("build/bench-quick"), (smollm2(),), smollm2(), tokens=16, repeats=2,
                tp_steps=16, users=(1, 4), serving_requests=16, serving_duration_s=15.0,
                multihost_rates=("10gbit",), multihost_steps=8, multihost_delays_us=(200.0,),
                cache=cache, command="make bench-quick")


def llama_cpp_ready(plan: Plan) -> bool:
    return plan.peers and machine.llama_cpp_version() is not None


def stage_model_level(plan: Plan, cores: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    peer = llama_cpp_ready(plan)
    for m in plan.models:
        for batch in plan.batches:
            args = (batch, plan.prompt, plan.tokens, cores, plan.repeats)
            for system in ("cpumesh", "transformers"):
                r = model_level.run_system(system, m.model_dir, *args)
                rows.append(_row(m, system, "float32", batch, plan, r))
            for ftype in plan.gguf_types if peer else ():
                gguf = export_gguf(m.model_dir, plan.cache / f"{m.name}.{ftype}.gguf", ftype)
                r = model_level.run_peer(gguf, *args)
                rows.append(_row(m, f"llama.cpp {ftype}", ftype, batch, plan, r))
    skipped = None if peer else (
        "llama.cpp: disabled for this run" if not plan.peers else
        f"llama.cpp: llama-cpp-python is not installed in {machine.BENCH_PYTHON.parent.parent}"
        " (run `make bench-env`)")
    if skipped:
        print(f"[bench] skipped {skipped}", flush=True)
    return {"rows": rows, "skipped": skipped, "prompt": plan.prompt, "tokens": plan.tokens,
            "repeats": plan.repeats, "threads": cores}


def _row(m: BenchModel, system: str, dtype: str, batch: int, plan: Plan,
         r: dict[str, Any]) -> dict[str, Any]:
    context = plan.prompt + plan.tokens // 2  # mean cache length during decode
    weight_bytes = {"float32": 4.0, "F32": 4.0, "F16": 2.0}[dtype]
    return {"model": m.name, "label": m.label, "system": system, "dtype": dtype, "batch": batch,
            "prefill_ms": r["prefill_ms"], "decode_step_ms": r["decode_step_ms"],
            "step_bytes": m.step_bytes(batch, context, weight_bytes), "prompt": plan.prompt,
            "tokens": plan.tokens, "repeats": plan.repeats, "command": r["command"]}


def stage_tp(plan: Plan, cores: int) -> dict[str, Any]:
    rows = []
    for m in plan.models:
        layers = m.config["num_hidden_layers"]
        for tp in (1, 2):
            for batch in plan.batches:
                r = shard_steps.run(m.model_dir, tp, batch, plan.tp_steps, cores)
                rows.append({"model": m.name, "label": m.label, "layers": layers, **r,
                             "command": f"python -m bench.shard_steps --model-dir {m.model_dir}"
                                        f" --steps {plan.tp_steps} --cores {cores}"})
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the ~5-minute subset")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cpumesh" / "bench")
    p.add_argument("--out-dir", type=Path, help="default: . (full) or build/bench-quick")
    p.add_argument("--only", help="comma-separated stages to (re)run; others are read back")
    p.add_argument("--models", help="comma-separated model names to keep (e.g. smollm2-135m)")
    p.add_argument("--serving-duration", type=float, help="seconds of issuing per load level")
    a = p.parse_args(argv)
    a.cache.mkdir(parents=True, exist_ok=True)
    with_1b = not a.models or "llama-1b-random" in a.models
    plan = quick_plan(a.cache) if a.quick else full_plan(a.cache, with_1b)
    if a.out_dir:
        plan = replace(plan, out_dir=a.out_dir)
    if a.models:
        plan = replace(plan, models=tuple(m for m in plan.models if m.name in a.models))
    if a.serving_duration:
        plan = replace(plan, serving_duration_s=a.serving_duration)
    run_plan(plan, set(a.only.split(",")) if a.only else None)
    return 0


def run_plan(plan: Plan, only: set[str] | None = None) -> Path:
    """Run the stages (or only those named), saving each one's JSON at once; write the report."""
    results = plan.out_dir / "bench" / "results" if plan.out_dir == Path(".") \
        else plan.out_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    stages = {
        "machine": lambda: machine.describe(),
        "model_level": lambda: stage_model_level(plan, cores),
        "tp_scaling": lambda: stage_tp(plan, cores),
        "multihost": lambda: multihost.run(
            plan.serving_model.model_dir, plan.multihost_rates, plan.multihost_steps,
            plan.multihost_delays_us, plan.multihost_baseline),
        "serving": lambda: serving.run(
            plan.serving_model.model_dir, _serving_gguf(plan), cores, list(plan.users),
            plan.serving_requests, plan.serving_duration_s, output=plan.serving_output),
    }
    for name, fn in stages.items():
        if only is not None and name not in only:
            continue
        t0 = time.time()
        print(f"[bench] {name} ...", flush=True)
        data = fn()
        data["stage_seconds"] = time.time() - t0
        data["load_avg_after"] = os.getloadavg()[0]
        path = results / f"{name}.json"
        if name in ("model_level", "tp_scaling") and path.exists():
            data = merge_rows(json.loads(path.read_text()), data,
                              {m.name for m in plan.models})
        path.write_text(json.dumps(data, indent=2, default=str))
        print(f"[bench] {name} done in {data['stage_seconds']:.0f} s", flush=True)
    md = report.write(results, plan.out_dir, plan.command)
    print(f"[bench] wrote {md}")
    return md


def merge_rows(old: dict[str, Any], new: dict[str, Any], measured: set[str]) -> dict[str, Any]:
    """The new stage result, with the old rows of models not measured this time kept first
    (`--models` reruns one model without losing the others' figures). Stage-wide settings
    (tokens, repeats) are copied into the rows that lack them, so each row keeps its own."""
    settings = {k: old[k] for k in ("prompt", "tokens", "repeats", "threads") if k in old}
    kept = [{**settings, **r} for r in old.get("rows", []) if r["model"] not in measured]
    if kept:
        print(f"[bench] kept {len(kept)} earlier row(s) of "
              f"{', '.join(sorted({r['model'] for r in kept}))}", flush=True)
    return {**new, "rows": kept + new["rows"]}


def _serving_gguf(plan: Plan) -> Path | None:
    if not llama_cpp_ready(plan):
        return None
    m = plan.serving_model
    return export_gguf(m.model_dir, plan.cache / f"{m.name}.F32.gguf", "F32")


if __name__ == "__main__":
    raise SystemExit(main())
