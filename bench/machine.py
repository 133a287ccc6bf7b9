"""The machine a benchmark ran on: CPU, cores, memory, versions, load, and its read bandwidth.

    python -m bench.machine [--mib 512]

Read bandwidth is measured as torch's `sum` over a float32 array far larger than the caches, on
one thread and on all cores, best of several passes: the ceiling for a decode step, which must
read every weight once. Prints JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

BENCH_PYTHON = Path("build/bench-venv/bin/python")  # llama-cpp-python lives only here


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def llama_cpp_version(python: Path = BENCH_PYTHON) -> str | None:
    """llama-cpp-python's version in the bench environment, None when it is not installed."""
    if not python.exists():
        return None
    out = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def read_bandwidth_gbs(threads: int, mib: int = 512, passes: int = 5) -> float:
    """Best-of-`passes` GB/s of a float32 sum over `mib` MiB with `threads` torch threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
        x.sum()  # fault the pages in
        best = float("inf")
        for _ in range(passes):
            t0 = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t0)
        return x.nbytes / best / 1e9
    finally:
        torch.set_num_threads(before)


def describe(mib: int = 512) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0))
    return {
        "cpu": cpu_model(), "cores": cores, "memory_gib": round(mem_total_gib(), 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "transformers", "numpy", "pyzmq",
                                             "grpcio")} | {"llama-cpp-python":
                                                           llama_cpp_version()},
        "commit": git_commit(),
        "load_avg_before": os.getloadavg()[0],
        "read_gbs": {"1": read_bandwidth_gbs(1, mib), str(cores): read_bandwidth_gbs(cores, mib)},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512)
    print(json.dumps(describe(p.parse_args(argv).mib), indent=2))


if __name__ == "__main__":
    main()
