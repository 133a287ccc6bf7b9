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
            full: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def point(kind: str, dtype: str, batch: int, prompt: int, tokens: int) -> None:
        ours = run_system("cpumesh", m.model_dir, batch, prompt, tokens, threads, repeats, dtype)
        peer = run_peer(gguf[GGUF[dtype]], batch, prompt, tokens, threads, repeats)
        row = {"model": m.name, "kind": kind, "dtype": dtype, "peer": f"llama.cpp {GGUF[dtype]}",
               "batch": batch, "prompt": prompt, "ours": ours, "llama.cpp": peer}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("ours", "llama.cpp")}
                         | {"ours_ms": med(ours, kind), "peer_ms": med(peer, kind)}), flush=True)

    for dtype in ("float32", "bfloat16", "float16"):
        point("decode", dtype, 1, 32, 32)
    for dtype in ("float32", "bfloat16"):
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
        out.append(f"| {r['model']} | {what} | {r['dtype']} ({r['peer']}) | {r['batch']} | "
                   f"{r['prompt']} | {ours:.1f} | {peer:.1f} | {ours / peer:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2"], choices=["smollm2", "llama1b"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path("build/bench-models"))
    a = p.parse_args(argv)
    if not BENCH_PYTHON.exists():
        raise SystemExit(f"llama.cpp's environment is missing ({BENCH_PYTHON}): make bench-env")
    rows = []
    a.cache.mkdir(parents=True, exist_ok=True)
    for name in a.models:
        m = smollm2() if name == "smollm2" else llama_1b(a.cache)
        gguf = {f: export_gguf(m.model_dir, a.cache / f"{m.name}-{f}.gguf", f)
                for f in ("F32", "F16")}
        rows += measure(m, gguf, a.threads, a.repeats, full=name == "smollm2")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                   "threads": a.threads, "rows": rows}, indent=1))
    print(report(rows))


if __name__ == "__main__":
    main()
