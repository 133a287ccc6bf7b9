"""The matrix products of a SmolLM2 decode step alone, eager against inductor with the weights
frozen into the graph: what a compiled step with frozen weights could gain (issue 15).

    python -m bench.frozen_gemm [--dtype bfloat16] [--mode max-autotune] [--threads 2]

A chain of SmolLM2-135M's 30 layers' products (QKV 576->960, O 576->576, gate/up 576->3072,
down 1536->576; no attention, no LM head), random weights, in eager F.linear (torch's default
kernels) and compiled with `torch._inductor.config.freezing` (weights as constants, so inductor
may pick its own GEMM kernels, e.g. its AMX micro-GEMM); median ms of 30 calls at batch 1 and 8,
with the compile time and load average. Prints one line per point.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

LAYERS = 30


class Products(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def stack(n_in: int, n_out: int) -> torch.nn.ModuleList:
            return torch.nn.ModuleList(torch.nn.Linear(n_in, n_out, bias=False)
                                       for _ in range(LAYERS))

        self.qkv, self.o, self.gate_up, self.down = (stack(576, 960), stack(576, 576),
                                                     stack(576, 3072), stack(1536, 576))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(LAYERS):
            x = x + self.o[i](self.qkv[i](x)[:, :576])
            gate, up = self.gate_up[i](x).chunk(2, -1)
            x = x + self.down[i](F.silu(gate) * up)
        return x


def median_ms(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    for _ in range(3):
        f(x)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        f(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--mode", default="max-autotune")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = Products().to(getattr(torch, a.dtype)).eval()
    with torch.no_grad():
        xs = {b: torch.randn(b, 576).to(getattr(torch, a.dtype)) for b in (1, 8)}
        for b, x in xs.items():
            print(f"{a.dtype} batch {b}: eager {median_ms(model, x):.2f} ms "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
        torch._inductor.config.freezing = True
        compiled = torch.compile(model, mode=a.mode)
        for b, x in xs.items():
            t0 = time.monotonic()
            compiled(x)
            print(f"{a.dtype} batch {b}: frozen {a.mode} {median_ms(compiled, x):.2f} ms, "
                  f"compiled in {time.monotonic() - t0:.0f} s (load {os.getloadavg()[0]:.2f})",
                  flush=True)


if __name__ == "__main__":
    main()
