"""Multi-host emulation (tp 2 over emulated links) and the Qwen2-72B projection.

    python -m bench.multihost [--model-dir DIR] [--steps 32] [--delays-us 0,50,200,1000]
                              [--rates 10gbit,25gbit] [--out bench/results/multihost.json]

Each shard runs in its own network namespace (bench/netns.py), joined to the root namespace by a
veth pair whose rate a `tbf` qdisc limits. Link delay would normally come from `sch_netem`; that
module is missing on this benchmark's machine, so the mesh traffic always passes through
user-space delay relays in the root namespace instead (bench/delay_relay.py; one method
everywhere keeps results comparable), two per receiving rank: one for ZeroMQ (handshake,
heartbeats), one for the tcp data connection. Every rank's peers list names the relays, every
rank binds its own address, and the data listener's port is fixed (peers reach it at their peers
entry's host). The mesh transport is forced to tcp (shared memory would cross the namespaces).
A driver in the root namespace steps both shards over gRPC directly (no added delay), as
bench/shard_steps.py does. First the relay's accuracy is measured (a ping-pong on loopback,
direct against through the relay) and tbf's rate is checked with a bulk transfer; a
no-namespace loopback group (tcp, no relay) is the baseline. Where namespaces cannot be made
(not root, no `ip`), the result says why and holds only the baseline.

The projection of a Qwen2-72B-shaped model on 4 nodes (the paper's setup: 4 × Xeon Platinum
8575C, 140 ms/token) combines what this machine measured with assumed hardware figures:
  measured: the fraction of read bandwidth cpumesh's decode achieves (largest model, batch 1,
            tp 1), the software cost of one allreduce of a hidden vector (tp 2 on loopback:
            allreduce wait per call), and the per-step overhead outside compute (gRPC, driver);
  assumed:  per-node memory bandwidth, link latency and rate, weight dtype (bf16), 4 nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from bench import netns, relay_process
from bench.relay_process import RelayProcess
from bench.shard_steps import measure
from tests.procs import Service, running, wait_serving
from tests.service.test_shard_service import ShardGroup, shard_group

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
DELAYS_US = (0.0, 50.0, 200.0, 1000.0)  # one-way, added on every mesh message
# Inside each namespace (its own port space); STREAM_PORT is also taken on the root side, where
# a peer reaches a rank's tcp data listener at (its peers entry's host, the listener's port).
MESH_PORT, STREAM_PORT, GRPC_PORT = 5600, 5601, 50061


def probe() -> dict[str, Any]:
    """What this machine allows: root, ip, tc, netns, and netem."""
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


def run(model_dir: Path, rates: tuple[str, ...], steps: int,
        delays_us: tuple[float, ...] = DELAYS_US, baseline: bool = True) -> dict[str, Any]:
    """The loopback baseline, the relay's accuracy, then ms/token per (rate, delay)."""
    facts = probe()
    out: dict[str, Any] = {"probe": facts, "batch": 1, "steps": steps, "tp": 2,
                           "load_avg_before": os.getloadavg()[0],
                           "model_dir": str(model_dir), "rates": list(rates),
                           "delays_us": list(delays_us), "baseline": None, "accuracy": None,
                           "links": None, "sweep": None, "skipped": None,
                           "command": "python -m bench.multihost --steps {} --delays-us {} "
                                      "--rates {}{}".format(
                               steps, ",".join(f"{d:g}" for d in delays_us), ",".join(rates),
                               "" if baseline else " --no-baseline")}
    if baseline:
        out["baseline"] = _loopback(model_dir, steps)
    reason = netns.unavailable() or (None if facts["netns"] else "`ip netns add` fails here")
    if reason:
        out["skipped"] = f"multi-host emulation not run: {reason}"
        print(f"[multihost] {out['skipped']}", flush=True)
        return out
    out["accuracy"] = relay_process.accuracy(list(delays_us))
    try:
        with netns.Hosts(2) as hosts, tempfile.TemporaryDirectory() as logs:
            out["links"] = [{"rate": r, "burst": netns.tbf_burst(r),
                             "bulk_gbit": _bulk_gbit(hosts, r)} for r in rates]
            out["sweep"] = _sweep(hosts, model_dir, rates, delays_us, steps, Path(logs))
    except (netns.NetnsError, RuntimeError, TimeoutError, OSError) as e:
        out["skipped"] = f"multi-host emulation failed: {e}"
        print(f"[multihost] {out['skipped']}", flush=True)
    return out


def _loopback(model_dir: Path, steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as logs, shard_group(
            model_dir, 2, Path(logs), extra=("--mesh-transport", "tcp", "--kv-capacity-tokens",
                                             "8192")) as (_, addrs):
        group = ShardGroup(addrs)
        measure(group, 1, 4)  # warm-up
        row = measure(group, 1, steps)
        group.close()
    return row


def _sweep(hosts: netns.Hosts, model_dir: Path, rates: tuple[str, ...],
           delays_us: tuple[float, ...], steps: int, logs: Path) -> list[dict[str, Any]]:
    """Shards in the namespaces, mesh traffic through one relay per receiving rank."""
    h = hosts.hosts
    relays: list[RelayProcess] = []
    try:
        for host in h:  # to each rank: ZeroMQ (control), then its tcp data listener
            relays.append(RelayProcess(f"{host.gateway}:0", f"{host.address}:{MESH_PORT}"))
            relays.append(RelayProcess(f"{host.gateway}:{STREAM_PORT}",
                                       f"{host.address}:{STREAM_PORT}"))
        peers = ",".join(r.address for r in relays[::2])
        services = [Service(f"shard{r}", [
            "-m", "bench.netns", host.ns, "shard_svc", "--model-dir", str(model_dir),
            "--tp-size", str(len(h)), "--tp-rank", str(r), "--peers", peers,
            "--mesh-listen", f"{host.address}:{MESH_PORT}", "--mesh-transport", "tcp",
            "--mesh-stream-port", str(STREAM_PORT), "--listen", f"{host.address}:{GRPC_PORT}",
            "--threads", "1", "--kv-capacity-tokens", "8192", "--mesh-timeout", "60"], logs)
            for r, host in enumerate(h)]
        rows = []
        with running(services):
            addrs = [f"{host.address}:{GRPC_PORT}" for host in h]
            for s, a in zip(services, addrs, strict=True):
                wait_serving(a, s)
            group = ShardGroup(addrs)
            try:
                measure(group, 1, 4)  # warm-up
                for rate in rates:
                    hosts.set_rate(rate)
                    for d in delays_us:
                        rows.append(_point(group, relays, rate, d, steps))
            except grpc.RpcError as e:
                tails = "\n".join(f"{s.name}: {s.log_tail(8)}" for s in services) + "".join(
                    f"\nrelay {k}: {relay.stats()}" for k, relay in enumerate(relays))
                raise RuntimeError(f"a Step failed: {getattr(e, 'details', str)()}\n{tails}") from e
            finally:
                group.close()
        return rows
    finally:
        for relay in relays:
            relay.close()


def _point(group: ShardGroup, relays: list[RelayProcess], rate: str, delay_us: float,
           steps: int) -> dict[str, Any]:
    for relay in relays:
        relay.set_delay(delay_us)
        relay.stats()  # count afresh
    row = {"rate": rate, "delay_us": delay_us, **measure(group, 1, steps),
           "relays": [{"to_rank": k // 2, "path": ("control", "data")[k % 2], **relay.stats()}
                      for k, relay in enumerate(relays)]}
    print(f"[multihost] {rate} {delay_us:g} µs: {row['wall_ms']:.1f} ms/token, allreduce wait "
          f"{row['allreduce_ms']:.2f} ms", flush=True)
    return row


def _bulk_gbit(hosts: netns.Hosts, rate: str, megabytes: int = 200) -> float:
    """Bulk TCP from host 0 to the root namespace through the shaped link (checks tbf)."""
    hosts.set_rate(rate)
    h = hosts.hosts[0]
    with socket.create_server((h.gateway, 0)) as server:
        port = server.getsockname()[1]
        code = (f"import socket; s = socket.create_connection(({h.gateway!r}, {port})); "
                f"b = bytes(1 << 20); [s.sendall(b) for _ in range({megabytes})]; s.close()")
        sender = subprocess.Popen(["ip", "netns", "exec", h.ns, sys.executable, "-c", code])
        try:
            server.settimeout(30)
            conn, _ = server.accept()
            t0, got = time.perf_counter(), 0
            with conn:
                while data := conn.recv(1 << 20):
                    got += len(data)
            return got * 8 / (time.perf_counter() - t0) / 1e9
        finally:
            sender.wait(30)


def project(achieved_fraction: float, allreduce_ms_per_call: float, overhead_ms: float,
            assumed: dict[str, float] = ASSUMED) -> dict[str, Any]:
    """ms/token of a Qwen2-72B-shaped model, batch 1, tensor-parallel over `nodes` nodes."""
    m, n = QWEN2_72B, assumed["nodes"]
    h, i, d = m["hidden"], m["intermediate"], m["head_dim"]
    per_layer = h * (m["heads"] * d + 2 * m["kv_heads"] * d) + m["heads"] * d * h + 3 * h * i
    params = m["layers"] * per_layer + m["vocab"] * h  # + the LM head (the embedding: one row)
    node_bytes = params * assumed["weight_bytes"] / n
    compute_ms = node_bytes / (assumed["node_read_gbs"] * 1e9 * achieved_fraction) * 1e3
    message = h * assumed.get("activation_bytes", assumed["weight_bytes"])  # one hidden vector
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, help="default: the embedded SmolLM2")
    p.add_argument("--steps", type=int, default=32, help="decode steps per point")
    p.add_argument("--delays-us", default=",".join(f"{d:g}" for d in DELAYS_US))
    p.add_argument("--rates", default="10gbit,25gbit")
    p.add_argument("--no-baseline", action="store_true", help="skip the loopback group")
    p.add_argument("--out", type=Path, default=Path("bench/results/multihost.json"))
    a = p.parse_args(argv)
    model_dir = a.model_dir
    if model_dir is None:
        from model_formats.embedded import default_model_dir
        model_dir = default_model_dir()
    delays = tuple(float(d) for d in a.delays_us.split(","))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up as on Ctrl-C
    r = run(model_dir, tuple(a.rates.split(",")), a.steps, delays, not a.no_baseline)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2))
    print(table(r))


def table(r: dict[str, Any]) -> str:
    lines = [f"tp 2, batch 1, {r['steps']} decode steps per point, medians (ms)",
             f"{'link':>16}{'delay µs':>10}{'ms/token':>10}{'allreduce':>10}{'compute':>9}"]
    points = [("loopback (tcp)", None, r["baseline"])] if r["baseline"] else []
    points += [(row["rate"], row["delay_us"], row) for row in r["sweep"] or []]
    for link, d, row in points:
        lines.append(f"{link:>16}{'-' if d is None else f'{d:g}':>10}{row['wall_ms']:>10.1f}"
                     f"{row['allreduce_ms']:>10.2f}{row['compute_ms']:>9.1f}")
    for a in r["accuracy"] or []:
        lines.append(f"relay at {a['delay_us']:g} µs: adds {a['added_one_way_us']:.0f} µs one-"
                     f"way (p90 {a['added_one_way_p90_us']:.0f})")
    if r["skipped"]:
        lines.append(r["skipped"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
