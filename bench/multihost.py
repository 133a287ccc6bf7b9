"""Multi-host emulation and the Qwen2-72B projection.

Emulation needs root, `ip netns` and the kernel's `sch_netem` qdisc (link delay); `probe()` checks
each in a throw-away namespace. Where netem is missing, the delay sweep cannot run, and the
result says so; the projection is made either way.

The projection of a Qwen2-72B-shaped model on 4 nodes (the paper's setup: 4 × Xeon Platinum
8575C, 140 ms/token) combines what this machine measured with assumed hardware figures:
  measured: the fraction of read bandwidth cpumesh's decode achieves (largest model, batch 1,
            tp 1), the software cost of one allreduce of a hidden vector (tp 2 on loopback:
            allreduce wait per call), and the per-step overhead outside compute (gRPC, driver);
  assumed:  per-node memory bandwidth, link latency and rate, weight dtype (bf16), 4 nodes.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

QWEN2_72B = {"hidden": 8192, "intermediate": 29568, "layers": 80, "heads": 64, "kv_heads": 8,
             "head_dim": 128, "vocab": 152064}
ASSUMED = {  # the paper's hardware, as we assume it (not measured here)
    "nodes": 4,
    "node_read_gbs": 250.0,  # one 8575C socket: 8 × DDR5-5600 = 358 GB/s peak, ~70 % sustained
    "weight_bytes": 2.0,  # bfloat16
    "link_latency_us": 20.0,  # one-way, 100 GbE with a kernel TCP stack
    "link_gbit": 100.0,
}
PAPER_MS = 140.0


def probe() -> dict[str, Any]:
    """What this machine allows: root, ip, tc, netns, and netem."""
    import os

    facts: dict[str, Any] = {"root": os.geteuid() == 0, "ip": bool(shutil.which("ip")),
                             "tc": bool(shutil.which("tc"))}
    facts["netns"] = facts["netem"] = False
    if not (facts["root"] and facts["ip"] and facts["tc"]):
        return facts
    ns = f"cmprobe{uuid.uuid4().hex[:6]}"
    try:
        if _ok(["ip", "netns", "add", ns]):
            facts["netns"] = True
            _ok(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
            facts["netem"] = _ok(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo",
                                  "root", "netem", "delay", "50us"])
            facts["tbf"] = _ok(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev",
                                "lo", "root", "tbf", "rate", "10gbit", "burst", "1mb",
                                "latency", "1ms"])
    finally:
        _ok(["ip", "netns", "del", ns])
    return facts


def _ok(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


def run(model_dir: Path, rates: tuple[str, ...], steps: int) -> dict[str, Any]:
    """The link sweep where netem exists; its absence stated plainly where not."""
    facts = probe()
    if not facts.get("netem"):
        return {"probe": facts, "sweep": None, "note": (
            "tc netem is not available in this kernel (`tc qdisc add ... netem` fails: the "
            "sch_netem module is missing), so link delay cannot be emulated here; the latency "
            "sweep was not run. The projection below uses the measured per-allreduce cost "
            "instead.")}
    return {"probe": facts, "sweep": None, "note": (
        "netem is available, but the namespace sweep is not implemented yet; the projection "
        "below uses the measured per-allreduce cost.")}


def project(achieved_fraction: float, allreduce_ms_per_call: float, overhead_ms: float,
            assumed: dict[str, float] = ASSUMED) -> dict[str, Any]:
    """ms/token of a Qwen2-72B-shaped model, batch 1, tensor-parallel over `nodes` nodes."""
    m, n = QWEN2_72B, assumed["nodes"]
    h, i, d = m["hidden"], m["intermediate"], m["head_dim"]
    per_layer = h * (m["heads"] * d + 2 * m["kv_heads"] * d) + m["heads"] * d * h + 3 * h * i
    params = m["layers"] * per_layer + m["vocab"] * h  # + the LM head (the embedding: one row)
    node_bytes = params * assumed["weight_bytes"] / n
    compute_ms = node_bytes / (assumed["node_read_gbs"] * 1e9 * achieved_fraction) * 1e3
    message = h * assumed["weight_bytes"]  # one hidden vector, batch 1
    wire_ms = (assumed["link_latency_us"] * 1e-3 +  # direct exchange: one hop, n-1 messages
               (n - 1) * message * 8 / (assumed["link_gbit"] * 1e9) * 1e3)
    calls = 2 * m["layers"]
    comm_ms = calls * (allreduce_ms_per_call + wire_ms)
    return {"params_b": params / 1e9, "node_weight_gb": node_bytes / 1e9,
            "compute_ms": compute_ms, "allreduce_calls": calls, "allreduce_ms": comm_ms,
            "overhead_ms": overhead_ms, "total_ms": compute_ms + comm_ms + overhead_ms,
            "paper_ms": PAPER_MS, "assumed": assumed,
            "measured": {"achieved_fraction": achieved_fraction,
                         "allreduce_ms_per_call": allreduce_ms_per_call,
                         "overhead_ms": overhead_ms}}
