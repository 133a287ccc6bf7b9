"""The benchmark plots (matplotlib, Agg backend, PNG), one function per figure."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_decode(ml: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    groups = sorted({(r["label"], r["batch"]) for r in ml["rows"]})
    systems = list(dict.fromkeys(r["system"] for r in ml["rows"]))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(systems))
    for k, system in enumerate(systems):
        xs, ys, lo, hi = [], [], [], []
        for g, (label, batch) in enumerate(groups):
            r = next((r for r in ml["rows"] if r["system"] == system and r["label"] == label
                      and r["batch"] == batch), None)
            if r is None:
                continue
            d = r["decode_step_ms"]
            med = statistics.median(d) / batch
            xs.append(g + k * width)
            ys.append(med)
            lo.append(med - min(d) / batch)
            hi.append(max(d) / batch - med)
        ax.bar(xs, ys, width, yerr=[lo, hi], label=system, capsize=2)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{label}\nbatch {b}" for label, b in groups], fontsize=8)
    ax.set_ylabel("decode ms per token (per sequence)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Decode, model level (median, min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tp(tp: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = tp["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [f"{r['model']}\ntp {r['tp']}, batch {r['batch']}" for r in rows]
    xs = range(len(rows))
    comp = [r["compute_ms"] for r in rows]
    ar = [r["allreduce_ms"] for r in rows]
    other = [max(0.0, r["other_ms"]) for r in rows]
    ax.bar(xs, comp, label="compute")
    ax.bar(xs, ar, bottom=comp, label="allreduce wait")
    ax.bar(xs, other, bottom=[c + a for c, a in zip(comp, ar, strict=True)], label="overhead")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ms per decode step")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Shard step split: tp 1 (all cores) vs tp 2 (1 core each)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_serving(sv: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    for system, rows in sv["systems"].items():
        tput = [r["tokens_per_s"] for r in rows]
        e2e = [(r["e2e_s"]["p50"] or 0) * 1e3 for r in rows]
        itl = [(r["itl_s"]["p50"] or 0) * 1e3 for r in rows]
        a1.plot(tput, e2e, "o-", label=system)
        a2.plot(tput, itl, "o-", label=system)
        for r, x, y in zip(rows, tput, e2e, strict=True):
            a1.annotate(str(r["users"]), (x, y), fontsize=7)
    a1.set_xlabel("throughput, output tokens/s")
    a1.set_ylabel("end-to-end latency p50, ms")
    a2.set_xlabel("throughput, output tokens/s")
    a2.set_ylabel("inter-token latency p50, ms")
    a1.legend(fontsize=7)
    a1.set_title("latency vs throughput (labels: users)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_projection(p: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    parts = [("weights", p["compute_ms"]), ("allreduces", p["allreduce_ms"]),
             ("overhead", p["overhead_ms"])]
    left = 0.0
    for name, value in parts:
        ax.barh(["projection"], [value], left=left, label=name)
        left += value
    ax.barh(["paper"], [p["paper_ms"]], color="grey", label="paper (measured)")
    ax.set_xlabel("ms per token, Qwen2-72B shapes, 4 nodes, batch 1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_multihost(mh: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    for rate in dict.fromkeys(r["rate"] for r in mh["sweep"]):
        rows = [r for r in mh["sweep"] if r["rate"] == rate]
        xs = [r["delay_us"] for r in rows]
        a1.plot(xs, [r["wall_ms"] for r in rows], "o-", label=f"{rate} (tbf)")
        a2.plot(xs, [r["allreduce_ms"] for r in rows], "o-", label=f"{rate} (tbf)")
    if mh.get("baseline"):
        for ax, key in ((a1, "wall_ms"), (a2, "allreduce_ms")):
            ax.axhline(mh["baseline"][key], color="grey", ls="--", label="loopback, no relay")
    a1.set_ylabel("ms per token (tp 2, batch 1)")
    a2.set_ylabel("allreduce wait per step, ms")
    for ax in (a1, a2):
        ax.set_xlabel("one-way link delay, µs (user-space relay)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    a1.set_title("Decode vs emulated link delay", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
