"""Allreduce latency of MeshGroup against torch.distributed (gloo) and raw ZeroMQ, same run, same
processes, same sizes.

    python -m bench.allreduce [--tp 2 4] [--sizes 2K 8K 64K 256K 1M 4M 16M] [--budget-s 0.4]
                              [--algorithms]

Each tensor-parallel size runs as that many spawned processes on loopback. In every process,
for every size in turn (float32; size in bytes), one after the other:
  raw rtt     ping-pong of the message between ranks 0 and 1 over a bare PAIR tcp socket
              (zero-copy send, recv_into): the issue's floor of any ZeroMQ exchange
  raw exch    every rank sends the message to every other over bare ZeroMQ PUSH/PULL sockets,
              no header, no sum, no deadline: the floor of a direct exchange through ZeroMQ
  tcp         MeshGroup, transport tcp (data on a plain TCP connection per pair; tcp),
              algorithm auto: what ranks on different hosts use without CURVE
  zmq         MeshGroup, transport zmq (data through the ZeroMQ sockets: what CURVE uses)
  shm         MeshGroup, transport auto (shared memory: all ranks share this host)
  gloo        torch.distributed.all_reduce, gloo backend
With --algorithms, MeshGroup tcp (direct, scatter, ring) and shm (direct, ring) are also timed
with the algorithm forced (to place the switch). p50 and p99 over every rank's samples (raw rtt:
rank 0's), a number of repeats fixed per size (~budget-s each at a rough cost model, >= 30).
Prints a table with the ratios and the issue's targets, writes bench/results/allreduce.json
and bench/plots/allreduce.png.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = ("2K", "8K", "16K", "64K", "256K", "1M", "4M", "16M")
FORCED = ("tcp direct", "tcp scatter", "tcp ring", "shm direct", "shm ring")  # --algorithms


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024 ** 2}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def label(nbytes: int) -> str:
    return f"{nbytes // 1024 ** 2} MiB" if nbytes >= 1024 ** 2 else f"{nbytes // 1024} KiB"


def repeats(nbytes: int, budget_s: float) -> int:
    """How often to repeat at this size: the same on every rank (collectives must pair up),
    about budget_s at a rough 60 µs + 2 ms/MiB, 30..3000 times."""
    estimate_s = 60e-6 + nbytes / 1024 ** 2 * 2e-3
    return min(3000, max(30, math.ceil(budget_s / estimate_s)))


def timed(fn: Any, count: int) -> list[float]:
    """Warm up, then call fn `count` times; seconds per call."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class RawZmq:
    """Bare PUSH/PULL sockets between every pair of ranks: no header, no checks, no sum."""

    def __init__(self, rank: int, ports: list[int], rtt_port: int) -> None:
        import zmq

        self.zmq, self.rank, self.n = zmq, rank, len(ports)
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(f"tcp://127.0.0.1:{ports[rank]}")
        self.push = {}
        for peer in range(self.n):
            if peer != rank:
                sock = self.ctx.socket(zmq.PUSH)
                sock.connect(f"tcp://127.0.0.1:{ports[peer]}")
                self.push[peer] = sock
        self.pair = None  # ranks 0 and 1 only: the round trip, apart from everything else
        if rank < 2:
            self.pair = self.ctx.socket(zmq.PAIR)
            endpoint = f"tcp://127.0.0.1:{rtt_port}"
            if rank == 0:
                self.pair.bind(endpoint)
            else:
                self.pair.connect(endpoint)
        self.barrier()

    def barrier(self) -> None:
        for sock in self.push.values():
            sock.send(b"b")
        for _ in self.push:
            self.pull.recv()

    def exchange(self, buf: np.ndarray, into: np.ndarray) -> None:
        for sock in self.push.values():
            sock.send(buf, copy=False)
        for _ in self.push:
            self.pull.recv_into(into)

    def round_trip(self, buf: np.ndarray, into: np.ndarray) -> None:
        assert self.pair is not None
        if self.rank == 0:
            self.pair.send(buf, copy=False)
            self.pair.recv_into(into)
        else:
            self.pair.recv_into(into)
            self.pair.send(buf, copy=False)

    def close(self) -> None:
        self.ctx.destroy(0)


def rank_main(rank: int, tp: int, ports: dict[str, list[int]], sizes: list[int],
              budget_s: float, algorithms: bool, out: Any) -> None:
    import faulthandler
    import signal

    import torch
    import torch.distributed as dist

    from shard_svc.mesh.group import MeshConfig, MeshGroup

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: where it waits
    torch.set_num_threads(1)
    raw = RawZmq(rank, ports["raw"], ports["rtt"][0])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports['gloo'][0]}",
                            rank=rank, world_size=tp)
    meshes = {"tcp": {"transport": "tcp"}, "zmq": {"transport": "zmq"},
              "shm": {"transport": "auto"}}
    if algorithms:
        for name in FORCED:
            transport, algo = name.split()
            meshes[name] = {"transport": transport, "algorithm": algo}
    mesh = {}
    for name, overrides in meshes.items():
        peers = tuple(f"127.0.0.1:{p}" for p in ports[name])
        mesh[name] = MeshGroup(MeshConfig(rank, tp, peers, mesh_name="bench", **overrides))
    results: dict[str, dict[int, list[float]]] = {}
    for nbytes in sizes:
        t = torch.zeros(nbytes // 4)  # zeros: the sums stay finite however often repeated
        buf, into = t.numpy().copy(), np.empty(nbytes // 4, np.float32)
        systems = {"raw rtt": lambda b=buf, i=into: raw.round_trip(b, i),
                   "raw exch": lambda b=buf, i=into: raw.exchange(b, i),
                   "gloo": lambda t=t: dist.all_reduce(t)}
        for name, m in mesh.items():
            systems[name] = lambda m=m, t=t: m.all_reduce(t)
        for name, fn in systems.items():
            raw.barrier()
            if name == "raw rtt" and rank > 1:
                continue
            results.setdefault(name, {})[nbytes] = timed(fn, repeats(nbytes, budget_s))
    transports = {name: m.transport for name, m in mesh.items()}
    for m in mesh.values():
        m.close()
    dist.destroy_process_group()
    raw.close()
    out.send((rank, results, transports))


def run_tp(tp: int, sizes: list[int], budget_s: float, algorithms: bool) -> dict[str, Any]:
    from tests.procs import free_ports

    names = ["raw", "rtt", "gloo", "tcp", "zmq", "shm"]
    if algorithms:
        names += list(FORCED)
    all_ports = free_ports(len(names) * tp)
    ports = {n: all_ports[i * tp:(i + 1) * tp] for i, n in enumerate(names)}
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for rank in range(tp):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=rank_main, args=(rank, tp, ports, sizes, budget_s,
                                                   algorithms, writer), daemon=True)
        proc.start()
        pipes.append(reader)
        procs.append(proc)
    try:
        per_rank = [p.recv() for p in pipes]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    per_rank.sort(key=lambda r: r[0])
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in per_rank[0][1]:
        for nbytes in sizes:
            # raw rtt: rank 0's clock is the round trip (rank 1 only echoes); otherwise every
            # rank's samples pooled (back-to-back collectives are not aligned in time, so an
            # elementwise max over ranks would add their jitter instead of measuring it)
            runs = [r[1][name][nbytes] for r in per_rank if nbytes in r[1].get(name, {})]
            pooled = np.concatenate([np.asarray(x) for x in runs[:1 if name == "raw rtt"
                                                                 else None]]) * 1e6
            table.setdefault(name, {})[str(nbytes)] = {
                "p50_us": float(np.percentile(pooled, 50)),
                "p99_us": float(np.percentile(pooled, 99)), "samples": len(pooled),
                "p50_us_by_rank": [float(np.percentile(x, 50) * 1e6) for x in runs]}
    return {"tp": tp, "transports": per_rank[0][2], "latency": table}


def report(runs: list[dict[str, Any]], sizes: list[int]) -> list[str]:
    lines = []
    shown = ["tcp", "zmq", "shm", "gloo", "raw rtt", "raw exch"]
    for run in runs:
        lat = run["latency"]
        lines.append(f"\ntp {run['tp']}  (p50 / p99 µs over all ranks' samples; float32)")
        head = f"{'size':>8} " + "".join(f"{n:>17}" for n in shown + sorted(
            set(lat) - set(shown)))
        lines.append(head + f"{'tcp/rtt':>9}{'zmq/rtt':>9}{'tcp/gloo':>9}{'shm/gloo':>9}")
        for nbytes in sizes:
            k = str(nbytes)
            cells = "".join(f"{lat[n][k]['p50_us']:>9.0f} /{lat[n][k]['p99_us']:>6.0f}"
                            for n in shown + sorted(set(lat) - set(shown)))
            p50 = {n: lat[n][k]["p50_us"] for n in lat}
            lines.append(f"{label(nbytes):>8} {cells}{p50['tcp'] / p50['raw rtt']:>9.2f}"
                         f"{p50['zmq'] / p50['raw rtt']:>9.2f}"
                         f"{p50['tcp'] / p50['gloo']:>9.2f}"
                         f"{p50['shm'] / p50['gloo']:>9.2f}")
    lines.append("\ntargets (p50):")
    for run in runs:
        lat, tp = run["latency"], run["tp"]
        for nbytes in sizes:
            p = {n: lat[n][str(nbytes)]["p50_us"] for n in lat}
            checks = []
            if nbytes <= 64 * 1024:
                checks.append(("tcp <= 1.2 x raw rtt", p["tcp"] <= 1.2 * p["raw rtt"]))
                if nbytes == 2048 and tp == 2:
                    checks.append(("shm <= 50 us", p["shm"] <= 50))
            if nbytes >= 1024 ** 2:
                for t in ("tcp", "shm"):
                    checks.append((f"{t} bandwidth >= 0.8 x gloo", p["gloo"] / p[t] >= 0.8))
            for t in ("tcp", "shm"):
                checks.append((f"{t} not slower than gloo", p[t] <= p["gloo"]))
            lines.append(f"  tp {tp} {label(nbytes):>7}: " + ", ".join(
                f"{what} {'MET' if ok else 'MISSED'}" for what, ok in checks))
    return lines


def plot(runs: list[dict[str, Any]], sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        colors = plt.get_cmap("tab20").colors
        for i, (name, rows) in enumerate(sorted(run["latency"].items())):
            ax.plot(sizes, [rows[str(s)]["p50_us"] for s in sizes], marker="o", label=name,
                    color=colors[i % len(colors)], linestyle="--" if name in FORCED else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [label(s) for s in sizes], fontsize=7)
        ax.set_xlabel("message (float32)")
        ax.set_ylabel("allreduce p50 (µs)")
        ax.set_title(f"tp {run['tp']}, loopback, {platform.machine()}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sizes", nargs="+", default=list(SIZES))
    p.add_argument("--budget-s", type=float, default=0.4)
    p.add_argument("--algorithms", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench/results/allreduce.json"))
    p.add_argument("--plot", type=Path, default=Path("bench/plots/allreduce.png"))
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes]
    runs = [run_tp(tp, sizes, args.budget_s, args.algorithms) for tp in args.tp]
    lines = report(runs, sizes)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sizes": sizes, "runs": runs, "report": lines,
                                    "machine": platform.machine()}, indent=1))
    plot(runs, sizes, args.plot)
    print(f"\nwrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
