"""Which kernels run the matrix products: chosen once at start, behind this one seam.

The model is plain torch; what differs between CPUs is which library serves `F.linear`:
oneDNN (torch's default for half precision) or ATen's own kernels (oneDNN off). Which is faster
depends on the CPU, the dtype and the number of tokens in the step: on an AVX-512 Zen4, ATen reads
half-precision weights at the memory roofline at batch 1 while oneDNN is 2-3x slower; with AMX,
oneDNN wins at larger batches. So at start, on this shard's own weights, both are timed for a
step of one token, a small batch and a prefill, the faster kept per bucket, and the choice logged
in one line. `KernelConfig.library` forces one (tests compare both against the plain float32
path).

Only `torch.backends.mkldnn`'s switch changes: the process's one torch user is the shard's step
thread, which sets it at the start of each step (`for_step`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LIBRARIES = ("auto", "aten", "onednn")
# Buckets by tokens in the step: decode of one sequence, a decode batch, a prefill.
BUCKETS = (1, 16, 2**31)
PROBE_TOKENS = (1, 8, 128)


@dataclass(frozen=True)
class KernelPlan:
    dtype: torch.dtype
    onednn: tuple[bool, ...]  # per bucket: run linears with oneDNN (else ATen's kernels)
    timings_us: tuple[tuple[float, float], ...] = ()  # per bucket: (aten, onednn) when measured

    def describe(self) -> str:
        parts = []
        for i, (limit, use) in enumerate(zip(BUCKETS, self.onednn, strict=True)):
            where = f"<= {limit} tokens" if limit < 2**31 else "more"
            timing = ""
            if self.timings_us:
                aten, dnn = self.timings_us[i]
                timing = f" (aten {aten:.0f} us, onednn {dnn:.0f} us)"
            parts.append(f"{where}: {'onednn' if use else 'aten'}{timing}")
        return (f"kernels for {str(self.dtype).removeprefix('torch.')} on "
                f"{torch.backends.cpu.get_cpu_capability()}: " + "; ".join(parts))

    def for_step(self, tokens: int) -> None:
        """Set the library for a step of `tokens` tokens."""
        bucket = next(i for i, limit in enumerate(BUCKETS) if tokens <= limit)
        if torch.backends.mkldnn.is_available():
            torch._C._set_mkldnn_enabled(self.onednn[bucket])


def choose_kernels(library: str, dtype: torch.dtype, weight: torch.Tensor) -> KernelPlan:
    """The plan for `library` ("auto": timed on `weight`, a [out, in] matrix of the model)."""
    if library not in LIBRARIES:
        raise ValueError(f"kernel library must be one of {LIBRARIES}, got {library!r}")
    if library != "auto":
        return KernelPlan(dtype, (library == "onednn",) * len(BUCKETS))
    timings = tuple(_time_both(weight.to(dtype), n) for n in PROBE_TOKENS)
    return KernelPlan(dtype, tuple(dnn < aten for aten, dnn in timings), timings)


def _time_both(weight: torch.Tensor, tokens: int, rounds: int = 7) -> tuple[float, float]:
    """Median µs of one F.linear of `tokens` rows with ATen and with oneDNN, interleaved."""
    x = torch.randn(tokens, weight.shape[1]).to(weight.dtype)
    samples: dict[bool, list[float]] = {False: [], True: []}
    before = torch._C._get_mkldnn_enabled()
    try:
        for _ in range(rounds):
            for onednn in (False, True):
                torch._C._set_mkldnn_enabled(onednn)
                samples[onednn].append(_time(lambda: F.linear(x, weight)))
    finally:
        torch._C._set_mkldnn_enabled(before)
    return statistics.median(samples[False]), statistics.median(samples[True])


def _time(fn: Callable[[], object], calls: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6
