"""Decode speed at each precision against llama.cpp, same weights, same run, same threads.

    python -m bench.decode_speed [--models smollm2 llama1b] [--threads 2] [--repeats 3]

Every point runs in a fresh process (bench.model_level; llama.cpp in build/bench-venv through
bench/llamacpp_peer.py, on GGUF files exported from the same weights by bench/gguf_export.py).
Measures, per model: batch-1 decode at float32 / bfloat16 / float16 (cpumesh, kernels chosen at
start as in a shard) against llama.cpp F32 / F16; batch-8 decode; decode at 128, 1024 and 4096
tokens of context; prefill of a 512-token prompt. Writes bench/results/decode_speed.json and
prints the tables with ratios and the issue's targets (PASS/MISS) as Markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any

from bench.gguf_export import export_gguf
from bench.machine import BENCH_PYTHON
from bench.model_level import run_peer, run_system
from bench.models import BenchModel, llama_1b, smollm2

RESULTS = Path("bench/results/decode_speed.json")
GGUF = {"float32": "F32", "bfloat16": "F16", "float16": "F16"}  # llama.cpp's peer precision


def measure(m: BenchModel, gguf: dict[str, Path], threads: int, repeats: int,
            full: bool, compile: str = "off", only_context: bool = False) -> list[dict[str, Any]]:
    """compile: "decode" runs cpumesh as a shard with --compile decode (its kernels chosen as
    that shard chooses them, decode steps compiled; prefill eager). only_context: the
    128 / 1024 / 4096-token points alone."""
    rows: list[dict[str, Any]] = []

    def point(kind: str, dtype: str, batch: int, prompt: int, tokens: int) -> None:
        ours = run_system("cpumesh", m.model_dir, batch, prompt, tokens, threads, repeats, dtype,
                          compile)
        peer = run_peer(gguf[GGUF[dtype]], batch, prompt, tokens, threads, repeats)
        row = {"model": m.name, "kind": kind, "dtype": dtype, "peer": f"llama.cpp {GGUF[dtype]}",
               "batch": batch, "prompt": prompt, "compile": compile, "ours": ours,
               "llama.cpp": peer}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("ours", "llama.cpp")}
                         | {"ours_ms": med(ours, kind), "peer_ms": med(peer, kind)}), flush=True)

    for dtype in () if only_context else ("float32", "bfloat16", "float16"):
        point("decode", dtype, 1, 32, 32)
    for dtype in () if only_context else ("float32", "bfloat16"):
        point("decode", dtype, 8, 32, 32)
        point("prefill", dtype, 1, 512, 2)
    if full:
        for context in (128, 1024, 4096):
            point("decode", "bfloat16", 1, context, 16)
    return rows


def med(result: dict[str, Any], kind: str) -> float:
    return statistics.median(result["decode_step_ms" if kind == "decode" else "prefill_ms"])


def report(rows: list[dict[str, Any]]) -> str:
    out = ["| model | what | dtype (peer) | batch | context | cpumesh ms | llama.cpp ms | "
           "ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, peer = med(r["ours"], r["kind"]), med(r["llama.cpp"], r["kind"])
        what = "decode ms/step" if r["kind"] == "decode" else f"prefill {r['prompt']} tokens"
        what += " (--compile decode)" if r.get("compile", "off") != "off" else ""
        out.append(f"| {r['model']} | {what} | {r['dtype']} ({r['peer']}) | {r['batch']} | "
                   f"{r['prompt']} | {ours:.1f} | {peer:.1f} | {ours / peer:.2f} |")
    return "\n".join(out)


def targets(rows: list[dict[str, Any]]) -> str:
    """The issue's targets that these rows decide, each PASS or MISS with its figures."""
    def find(model: str, kind: str, dtype: str, batch: int, prompt: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["model"].startswith(model) and r["kind"] == kind
                     and r["dtype"] == dtype and r["batch"] == batch and r["prompt"] == prompt),
                    None)

    def ratio(r: dict[str, Any]) -> float:
        return med(r["ours"], r["kind"]) / med(r["llama.cpp"], r["kind"])

    lines = []

    def check(name: str, ok: bool, detail: str) -> None:
        lines.append(f"- {'PASS' if ok else 'MISS'} {name}: {detail}")

    for model, label in (("llama-1b", "1B, batch 1, half precision"),
                         ("smollm2", "SmolLM2, batch 1, half precision")):
        r = find(model, "decode", "bfloat16", 1, 32)
        if r:
            check(label, ratio(r) <= 1.0, f"{ratio(r):.2f} x llama.cpp F16 (target <= 1.0)")
    r = find("smollm2", "decode", "float32", 1, 32)
    if r:
        check("SmolLM2, batch 1, float32", ratio(r) <= 0.8,
              f"{ratio(r):.2f} x llama.cpp F32 (target <= 0.8)")
    one, eight = find("smollm2", "decode", "bfloat16", 1, 32), find("smollm2", "decode",
                                                                      "bfloat16", 8, 32)
    if one and eight:
        gain = 8 * med(one["ours"], "decode") / med(eight["ours"], "decode")
        check("batch 8 tokens/s vs batch 1 (bfloat16)", gain >= 5, f"{gain:.1f} x (target >= 5)")
        check("batch 8 ms/step vs llama.cpp F16", ratio(eight) <= 1.0,
              f"{ratio(eight):.2f} x (target <= 1.0)")
    for dtype, peer in (("bfloat16", "F16"), ("float32", "F32")):
        r = find("smollm2", "prefill", dtype, 1, 512)
        if r:
            check(f"prefill 512 tokens, {dtype}", ratio(r) <= 1.0,
                  f"{1 / ratio(r):.2f} x llama.cpp {peer}'s tokens/s (target >= 1.0)")
    short, long = (find("smollm2", "decode", "bfloat16", 1, c) for c in (128, 4096))
    if short and long:
        growth = med(long["ours"], "decode") / med(short["ours"], "decode")
        theirs = med(long["llama.cpp"], "decode") / med(short["llama.cpp"], "decode")
        check("decode at 4k context vs 128", growth <= 1.5,
              f"{growth:.2f} x (target <= 1.5; llama.cpp {theirs:.2f} x)")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name and the vector extensions that decide the kernels."""
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(ext)}; torch capability {torch.backends.cpu.get_cpu_capability()})"


def section(result: dict[str, Any]) -> list[str]:
    """The BENCHMARKS.md section for bench/results/decode_speed.json."""
    compiled = any(r.get("compile", "off") == "decode" for r in result["rows"])
    context_only = all(r["prompt"] in (128, 1024, 4096) for r in result["rows"])
    return ["## Decode speed " + ("with --compile decode (the decode-speed issue)" if compiled
                                  else "by precision (the decode-speed issue)"), "",
            f"Machine: {result['machine']}, {result['threads']} threads for every system. "
            "cpumesh tp 1 with the kernels its shard chose at start (float32 / bfloat16 / "
            "float16 weights, activations and KV cache) against llama.cpp on GGUF files exported "
            "from the same weights (F32 for float32, F16 for the half precisions), each point in a "
            "fresh process, medians of 3 repeats; *ratio* < 1: cpumesh faster. Decode steps are "
            "measured after a prompt of *context* tokens.", "", report(result["rows"]), "",
            targets(result["rows"]), "",
            "Command: `python -m bench.decode_speed --models "
            + " ".join(n for n, prefix in (("smollm2", "smollm2"), ("llama1b", "llama-1b"))
                       if any(r["model"].startswith(prefix) for r in result["rows"]))
            + (" --compile decode" if compiled else "")
            + (" --only-context --out bench/results/decode_speed_context.json" if context_only
               else " --out bench/results/decode_speed_compiled.json" if compiled else "")
            + "` (llama.cpp from `make bench-env`)", ""]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2"], choices=["smollm2", "llama1b"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path("build/bench-models"))
    p.add_argument("--compile", default="off", choices=["off", "decode"],
                   help="run cpumesh as a shard with this --compile")
    p.add_argument("--only-context", action="store_true",
                   help="only decode at 128, 1024 and 4096 tokens of context (SmolLM2)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if not BENCH_PYTHON.exists():
        raise SystemExit(f"llama.cpp's environment is missing ({BENCH_PYTHON}): make bench-env")
    rows = []
    a.cache.mkdir(parents=True, exist_ok=True)
    for name in a.models:
        m = smollm2() if name == "smollm2" else llama_1b(a.cache)
        gguf = {f: export_gguf(m.model_dir, a.cache / f"{m.name}-{f}.gguf", f)
                for f in ("F32", "F16")}
        rows += measure(m, gguf, a.threads, a.repeats, name == "smollm2", a.compile,
                        a.only_context)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"machine": cpu_name(), "threads": a.threads,
                                   "rows": rows}, indent=1))
    print(report(rows))
    print()
    print(targets(rows))


if __name__ == "__main__":
    main()
