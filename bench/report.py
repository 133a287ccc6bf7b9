"""JSON results → BENCHMARKS.md (tables) and PNG plots (matplotlib).

    python -m bench.report [--results bench/results] [--out-dir .]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

from bench import multihost
from bench.figures import plot_decode, plot_projection, plot_serving, plot_tp
from bench.report_multihost import multihost_section

VENV_PYTHON = re.compile(r"\S*/\.venv/bin/python")  # shown as run from the repository root


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _mmm(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def machine_section(m: dict[str, Any], command: str) -> list[str]:
    bw = m["read_gbs"]
    v = m["versions"]
    return [
        f"Regenerate everything with `{command}` (`python -m bench`; `make bench-quick` runs a "
        "~5-minute subset into build/bench-quick/). Each figure lists the command that "
        "measured it.", "",
        "## Machine", "",
        f"* CPU: {m['cpu']}, {m['cores']} cores available, {m['memory_gib']} GiB, "
        f"kernel {m['kernel']}",
        "* Measured read bandwidth (float32 sum over 512 MiB, best of 5): "
        + ", ".join(f"{k} thread{'s' if k != '1' else ''}: **{g:.1f} GB/s**"
                    for k, g in bw.items()),
        f"* Python {m['python']}, " + ", ".join(f"{k} {val or 'not installed'}"
                                                for k, val in v.items())
        + f"; cpumesh commit {m['commit']}",
        f"* Load average at the start: {m['load_avg_before']:.1f} on {m['cores']} cores"
        + (" — **the machine was busy (other jobs running): figures are noisy**"
           if m["load_avg_before"] > 0.5 * m["cores"] else ""), ""]


def best_gbs(ml: dict[str, Any]) -> float:
    """The highest read bandwidth a model-level row reached, GB/s."""
    return max(r["step_bytes"] / statistics.median(r["decode_step_ms"]) * 1e-6
               for r in ml["rows"])


def roofline_gbs(ml: dict[str, Any], m: dict[str, Any]) -> float:
    """The roofline's bandwidth: the measured all-core read bandwidth, or the best a row
    reached when higher (the sum's figure is a floor: a tuned matvec may read faster)."""
    return max(*m["read_gbs"].values(), best_gbs(ml))


def model_section(ml: dict[str, Any], m: dict[str, Any], plots: Path) -> list[str]:
    measured, best = max(m["read_gbs"].values()), best_gbs(ml)
    bw_all = roofline_gbs(ml, m)
    runs = {(r.get("prompt", ml["prompt"]), r.get("tokens", ml["tokens"]),
             r.get("repeats", ml["repeats"])): r["label"] for r in ml["rows"]}
    settings = "; ".join(f"{label + ': ' if len(runs) > 1 else ''}prompt {p} token ids per "
                         f"sequence, decode {t} tokens, median of {n} repeats"
                         for (p, t, n), label in runs.items())
    settings = settings[0].upper() + settings[1:]
    out = ["## Model level: prefill and decode (item 1 and 2)", "",
           f"Threads: {ml['threads']} for every system. {settings} "
           "(min–max), each after a warm-up. A decode step advances every sequence of the batch "
           "by one token. *Bytes/step*: every weight read once (layers + LM head) plus each "
           "sequence's KV cache at the mean context; *BW*: those bytes / step time; *roofline*: "
           + (f"BW / the all-core read bandwidth, taken as {bw_all:.1f} GB/s: the best BW of "
              f"any row below, above the {measured:.1f} GB/s that the sum measured (which "
              "understates what this machine can read)" if best > measured else
              f"BW / the measured all-core read bandwidth ({bw_all:.1f} GB/s)")
           + ". cpumesh and "
           "transformers compute in float32; llama.cpp rows name their GGUF type (exported from "
           "the same float32 weights by `bench/gguf_export.py`).", ""]
    if ml.get("skipped"):
        out += [f"**Skipped:** {ml['skipped']}.", ""]
    out += ["| model | batch | system | decode ms/step (min–max) | tokens/s | prefill ms "
            "(min–max) | bytes/step | BW GB/s | roofline |", "|---" * 9 + "|"]
    for r in ml["rows"]:
        d, dmin, dmax = _mmm(r["decode_step_ms"])
        pf, pmin, pmax = _mmm(r["prefill_ms"])
        gbs = r["step_bytes"] / (d * 1e-3) / 1e9
        out.append(f"| {r['label']} | {r['batch']} | {r['system']} | {d:.1f} ({dmin:.1f}–"
                   f"{dmax:.1f}) | {r['batch'] * 1e3 / d:.1f} | {pf:.0f} ({pmin:.0f}–{pmax:.0f})"
                   f" | {r['step_bytes'] / 1e6:.0f} MB | {gbs:.1f} | {gbs / bw_all:.0%} |")
    out += ["", "### Headline: cpumesh tp 1 against each peer (ratio > 1: cpumesh faster)", "",
            "| model | batch | peer | decode ms/token cpumesh / peer | decode speed ratio | "
            "prefill speed ratio |", "|---|---|---|---|---|---|"]
    for r in ml["rows"]:
        if r["system"] == "cpumesh":
            continue
        ours = next(o for o in ml["rows"] if o["system"] == "cpumesh" and
                    o["model"] == r["model"] and o["batch"] == r["batch"])
        d_o, d_p = _mmm(ours["decode_step_ms"])[0], _mmm(r["decode_step_ms"])[0]
        p_o, p_p = _mmm(ours["prefill_ms"])[0], _mmm(r["prefill_ms"])[0]
        out.append(f"| {r['label']} | {r['batch']} | {r['system']} | {d_o / r['batch']:.1f} / "
                   f"{d_p / r['batch']:.1f} | {d_p / d_o:.2f}× | {p_p / p_o:.2f}× |")
    plot_decode(ml, plots / "decode.png")
    out += ["", "![decode](bench/plots/decode.png)", "", "Commands:", ""]
    out += [f"* `{VENV_PYTHON.sub('.venv/bin/python', r['command'])}`" for r in ml["rows"]]
    return [*out, ""]


def tp_section(tp: dict[str, Any], plots: Path) -> list[str]:
    out = ["## Tensor-parallel scaling on one box (item 3)", "",
           "tp 1: one shard process with all cores; tp 2: two processes with one core each, "
           "joined by the ZeroMQ mesh on loopback (shared memory). A driver sends the same Step "
           "over gRPC to every shard. Medians per decode step; *compute* and *allreduce wait* "
           "are the shards' own timings (mean over ranks), *overhead* is the rest of the "
           "driver's wall time (gRPC, driver, skew).", "",
           "| model | tp | batch | threads/shard | step ms | compute | allreduce wait | "
           "overhead | ms/token | speed-up vs tp 1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in tp["rows"]:
        base = next(b for b in tp["rows"] if b["model"] == r["model"] and b["tp"] == 1
                    and b["batch"] == r["batch"])
        out.append(f"| {r['label']} | {r['tp']} | {r['batch']} | {r['threads_per_shard']} | "
                   f"{r['wall_ms']:.1f} | {r['compute_ms']:.1f} | {r['allreduce_ms']:.2f} | "
                   f"{r['other_ms']:.1f} | {r['wall_ms'] / r['batch']:.2f} | "
                   f"{base['wall_ms'] / r['wall_ms']:.2f}× |")
    plot_tp(tp, plots / "tp_scaling.png")
    commands = sorted({r["command"] for r in tp["rows"]})
    return [*out, "", "![tp scaling](bench/plots/tp_scaling.png)", "", "Commands:", "",
            *[f"* `{c}`" for c in commands], ""]


def projection_section(ml: dict[str, Any], tp: dict[str, Any], m: dict[str, Any],
                       plots: Path) -> list[str]:
    out = ["### Qwen2-72B projection", ""]
    big = max(ml["rows"], key=lambda r: r["step_bytes"])["model"]
    b1 = min(r["batch"] for r in ml["rows"])  # batch 1 in every real run
    ours = next(r for r in ml["rows"] if r["model"] == big and r["system"] == "cpumesh"
                and r["batch"] == b1)
    d = _mmm(ours["decode_step_ms"])[0]
    fraction = ours["step_bytes"] / (d * 1e-3) / 1e9 / roofline_gbs(ml, m)
    t2 = next(r for r in tp["rows"] if r["model"] == big and r["tp"] == 2 and r["batch"] == b1)
    per_call = t2["allreduce_ms"] / (2 * t2["layers"])
    p = multihost.project(fraction, per_call, t2["other_ms"])
    plot_projection(p, plots / "projection.png")
    a = p["assumed"]
    out += [
        f"Qwen2-72B shapes ({p['params_b']:.1f} B parameters read per token), batch 1, tp "
        f"{a['nodes']} over {a['nodes']} nodes, {p['node_weight_gb']:.1f} GB of weights per "
        "node:", "",
        "| part | ms/token | from |", "|---|---|---|",
        f"| weights / (node bandwidth × achieved fraction) | {p['compute_ms']:.1f} | measured "
        f"fraction {fraction:.0%} (cpumesh, {ours['label']}, batch {b1}, tp 1); assumed "
        f"{a['node_read_gbs']:.0f} GB/s per node, {a['weight_bytes']:.0f}-byte weights |",
        f"| {p['allreduce_calls']} allreduces | {p['allreduce_ms']:.1f} | measured "
        f"{per_call * 1e3:.0f} µs per call (tp 2 loopback wait, which includes rank skew); "
        f"assumed {a['link_latency_us']:.0f} µs link latency, {a['link_gbit']:.0f} Gbit/s |",
        f"| per-step overhead | {p['overhead_ms']:.1f} | measured (tp 2, batch {b1}: gRPC "
        "and driver) |",
        f"| **total** | **{p['total_ms']:.0f}** | paper: **{p['paper_ms']:.0f} ms/token** "
        "(4 × Xeon 8575C) |", "",
        "Assumed, not measured: node bandwidth, link latency and rate, bf16 weights, one "
        "socket per node. Measured here: the achieved bandwidth fraction, the per-allreduce "
        "software cost and the per-step overhead, on this small machine and these small "
        "models; they need not transfer to a 72B model on a Xeon.", "",
        "![projection](bench/plots/projection.png)", ""]
    return out


def serving_section(sv: dict[str, Any], plots: Path) -> list[str]:
    out = ["## Service-level load test (item 5)", "",
           f"`cpumesh loadtest` in closed loop; prompts {sv['prompt_tokens']} words, outputs "
           f"{sv['output_tokens']} tokens (uniform), greedy, EOS ignored where the server "
           f"allows; each level bounded to {sv['requests']} requests (at least one per user) "
           f"and {sv['duration_s']:.0f} s of issuing. Goodput: requests/s with TTFT <= "
           f"{sv['slo_ttft_s']} s and mean ITL <= {sv['slo_itl_s']} s. The model: SmolLM2."
           " *Out tok/req*: mean output tokens per request, and the mean asked for.",
           "", "| system | users | ok | errors | out tok/req (asked) | tokens/s | req/s | goodput "
           "req/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms | e2e p50/p90/p99 ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(p: dict[str, float | None]) -> str:
        return " / ".join("-" if p[q] is None else f"{p[q] * 1e3:.0f}"
                          for q in ("p50", "p90", "p99"))

    def length(r: dict[str, Any]) -> str:
        if r.get("output_tokens_per_request") is None:  # before the loadtest reported it
            return f"{r['output_tokens'] / max(1, r['ok']):.1f} (-)"
        flag = " **short**" if r["length_mismatches"] else ""
        return (f"{r['output_tokens_per_request']:.1f} ({r['requested_tokens_per_request']:.1f})"
                f"{flag}")

    short = []
    for system, rows in sv["systems"].items():
        for r in rows:
            if r.get("length_mismatches", 1):
                short.append(f"{system} at {r['users']} users")
            out.append(f"| {system} | {r['users']} | {r['ok']} | {r['errors'] or '-'} | "
                       f"{length(r)} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                       f"{r['goodput_requests_per_s']:.2f} | {ms(r['ttft_s'])} | "
                       f"{ms(r['itl_s'])} | {ms(r['e2e_s'])} |")
    plot_serving(sv, plots / "serving.png")
    if short:
        out += ["", "**Not like for like:** requests shorter than asked (or not checked, in "
                "results from before the loadtest reported lengths) in: " + "; ".join(short)
                + ". Their tokens/s and end-to-end latency do not compare; TTFT and ITL do."]
    if any(name.startswith("llama") for name in sv["systems"]):
        out += ["", "llama-cpp-python's server ignores `ignore_eos`; the loadtest also sends "
                "`min_tokens` equal to `max_tokens`, which it honours, and it runs with "
                "`--interrupt_requests False` (by default a waiting request ends the one "
                "streaming). It serves one request at a time (no batching): the others queue, "
                "which shows in TTFT."]
    return [*out, "", "![serving](bench/plots/serving.png)", "",
            "Command: `python -m bench.serving` (per level: `cpumesh loadtest grpc://ROUTER "
            "--users N ...` or `cpumesh loadtest http://LLAMA_SERVER --users N ...`).", ""]


def allreduce_section(ar: dict[str, Any]) -> list[str]:
    """The mesh's allreduce against gloo and raw ZeroMQ: bench.allreduce's own table, as run
    on its own (`make bench` does not rerun it: its processes would compete with the rest)."""
    return ["## Mesh allreduce (the ZeroMQ mesh issue)", "",
            "p50 / p99 µs per allreduce, float32, every rank's samples; tp 4 runs 4 processes on "
            "this machine's cores. *tcp*: data on a plain TCP connection per pair of ranks "
            "(what ranks on different hosts use); *zmq*: through ZeroMQ (what CURVE uses); "
            "*shm*: shared memory (what one host uses); *raw rtt*: a bare ZeroMQ ping-pong "
            "between two ranks; *raw exch*: every rank sends the message to every other over "
            "bare ZeroMQ sockets.", "", "```", *ar["report"], "```", "",
            "![allreduce](bench/plots/allreduce.png)", "",
            "Command: `python -m bench.allreduce --tp 2 4 --algorithms --budget-s 0.4`", ""]


def write(results: Path, out_dir: Path, command: str) -> Path:
    plots = out_dir / "bench" / "plots" if out_dir == Path(".") else out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    m, ml, tp = (_load(results, n) for n in ("machine", "model_level", "tp_scaling"))
    mh, sv = _load(results, "multihost"), _load(results, "serving")
    lines = ["# cpumesh benchmarks", "",
             "Generated by `bench/report.py` from the JSON in " + str(results) + ".", ""]
    if m:
        lines += machine_section(m, command)
    if ml and m:
        lines += model_section(ml, m, plots)
    if tp:
        lines += tp_section(tp, plots)
    if mh:
        lines += multihost_section(mh, plots)
    if ml and tp and m:
        lines += projection_section(ml, tp, m, plots)
    if sv:
        lines += serving_section(sv, plots)
    if ar := _load(results, "allreduce"):
        lines += allreduce_section(ar)
    if ds := _load(results, "decode_speed"):
        from bench.decode_speed import section

        lines += section(ds)
    for name in ("decode_speed_compiled", "decode_speed_context"):
        if dsc := _load(results, name):
            from bench.decode_speed import section

            lines += section(dsc)
    if da := _load(results, "decode_attention"):
        from bench.decode_attention import section as attention_section

        lines += attention_section(da)
    from bench.quantized_speed import section as quantized_section

    for name in ("quantized_speed", "quantized_speed_compiled"):
        if qs := _load(results, name):
            lines += quantized_section(qs)
    for name in ("precision_ratio", "precision_ratio_eager"):
        if pr := _load(results, name):
            from bench.precision_ratio import section as precision_section

            lines += precision_section(pr)
    if ga := _load(results, "greedy_agreement"):
        from bench.greedy_agreement import section as agreement_section

        lines += agreement_section(ga)
    if q := _load(results, "quality"):
        from bench.quality import section as quality_section

        lines += quality_section(q, "python -m bench.quality")
    if rb := _load(results, "router_bounds"):
        from bench.router_burst import section as bounds_section

        lines += bounds_section(rb)
    prefix = {p.stem: json.loads(p.read_text())
              for p in sorted(results.glob("prefix_serving*.json"))}
    if prefix := {name: r for name, r in prefix.items() if "answer" in r}:
        from bench.prefix_serving import section as prefix_section

        lines += prefix_section(prefix)
    text = "\n".join(lines)
    if out_dir != Path("."):
        text = text.replace("](bench/plots/", "](plots/")
    md = out_dir / "BENCHMARKS.md"
    md.write_text(text)
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    p.add_argument("--out-dir", type=Path, default=Path("."))
    p.add_argument("--command", default="make bench")
    a = p.parse_args(argv)
    print(write(a.results, a.out_dir, a.command))


if __name__ == "__main__":
    main()
