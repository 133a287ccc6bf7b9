"""The engine's counters and timings, for logs, benchmarks and (later) Prometheus metrics."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from router_svc.shards import StepResult

if TYPE_CHECKING:
    from router_svc.sequence import Sequence, Usage

RECENT_STEPS = 4096  # per-step timings kept for percentiles


class StatsListener(Protocol):
    """Told of each step and request event as it happens (the Prometheus metrics)."""

    def on_step(self, batch: int, result: StepResult, wall_s: float,
                overhead_s: float) -> None: ...
    def on_scheduled(self, seq: Sequence, now: float) -> None: ...  # its prefill step is sent
    def on_sampled(self, seq: Sequence, now: float) -> None: ...  # one more token sampled
    def on_ended(self, seq: Sequence, usage: Usage) -> None: ...  # whatever the outcome
    def on_failure(self) -> None: ...  # a step or health check failed the shard group
    def on_preempted(self, count: int) -> None: ...  # sequences preempted (KV cache full)
    def on_refused(self, api: str, seconds: float) -> None: ...  # a request refused unread


@dataclass
class EngineStats:
    steps: int = 0
    step_failures: int = 0
    prefills: int = 0  # sequences prefilled
    prefill_tokens: int = 0  # tokens the prefills carried (recomputed ones included)
    cached_tokens: int = 0  # of those, the ones the shards found in their prefix cache
    preemptions: int = 0  # sequences preempted (and recomputed later) for lack of KV pages
    batch_seqs: int = 0  # sequences per step, summed over steps
    shard_compute_s: float = 0.0  # the slowest shard's compute, summed over steps
    shard_allreduce_s: float = 0.0
    overhead_s: float = 0.0  # engine time per step not spent awaiting shards or tokenizer
    waits_s: dict[str, float] = field(default_factory=dict)  # awaited, by what: shards, ...
    finished: Counter[str] = field(default_factory=Counter)  # requests, by finish reason
    recent_overhead_s: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    recent_step_s: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    listeners: list[StatsListener] = field(default_factory=list)

    @property
    def waited_s(self) -> float:
        return sum(self.waits_s.values())

    def add_wait(self, kind: str, seconds: float) -> None:
        self.waits_s[kind] = self.waits_s.get(kind, 0.0) + seconds

    def record_step(self, prefills: int, batch: int, prefill_tokens: int, result: StepResult,
                    wall_s: float, overhead_s: float) -> None:
        self.steps += 1
        self.prefills += prefills
        self.prefill_tokens += prefill_tokens
        self.cached_tokens += result.cached_tokens
        self.batch_seqs += batch
        self.shard_compute_s += result.compute_s
        self.shard_allreduce_s += result.allreduce_s
        self.overhead_s += overhead_s
        self.recent_overhead_s.append(overhead_s)
        self.recent_step_s.append(wall_s)
        for listener in self.listeners:
            listener.on_step(batch, result, wall_s, overhead_s)

    def failed(self) -> None:
        self.step_failures += 1
        for listener in self.listeners:
            listener.on_failure()

    def preempted(self, count: int) -> None:
        self.preemptions += count
        for listener in self.listeners:
            listener.on_preempted(count)

    def refused(self, api: str, seconds: float) -> None:
        """A request refused before any work (RESOURCE_EXHAUSTED, HTTP 429) over `api` ("grpc"
        or "http"), `seconds` after its handler began, when its status was sent."""
        for listener in self.listeners:
            listener.on_refused(api, seconds)

    def scheduled(self, seq: Sequence, now: float) -> None:
        for listener in self.listeners:
            listener.on_scheduled(seq, now)

    def sampled(self, seq: Sequence, now: float) -> None:
        for listener in self.listeners:
            listener.on_sampled(seq, now)

    def ended(self, seq: Sequence, usage: Usage) -> None:
        if seq.finish is not None:
            self.finished[seq.finish.reason.value] += 1
        for listener in self.listeners:
            listener.on_ended(seq, usage)

    def as_dict(self) -> dict[str, object]:
        """Totals, and per-step means and percentiles in milliseconds (JSON-ready)."""
        n = max(self.steps, 1)
        overhead = sorted(self.recent_overhead_s) or [0.0]
        step = sorted(self.recent_step_s) or [0.0]

        def pct(values: list[float], q: float) -> float:
            return 1e3 * values[int(q * (len(values) - 1))]

        return {
            "steps": self.steps, "step_failures": self.step_failures,
            "mean_batch": self.batch_seqs / n, "prefills": self.prefills,
            "prefill_tokens": self.prefill_tokens, "cached_tokens": self.cached_tokens,
            "preemptions": self.preemptions, "finished": dict(self.finished),
            "overhead_ms": 1e3 * self.overhead_s / n, "overhead_p50_ms": pct(overhead, 0.5),
            "overhead_p99_ms": pct(overhead, 0.99), "step_p50_ms": pct(step, 0.5),
            "wait_ms": {k: 1e3 * v / n for k, v in sorted(self.waits_s.items())},
            "shard_compute_ms": 1e3 * self.shard_compute_s / n,
            "shard_allreduce_ms": 1e3 * self.shard_allreduce_s / n,
        }

    def summary(self) -> str:
        """One line: steps, mean batch, and per-step milliseconds of each part."""
        n = max(self.steps, 1)
        recent = sorted(self.recent_overhead_s) or [0.0]
        waits = " ".join(f"{k} {1e3 * v / n:.3f}" for k, v in sorted(self.waits_s.items()))
        return (f"steps {self.steps} failures {self.step_failures} mean_batch "
                f"{self.batch_seqs / n:.2f} prefills {self.prefills} prefix cached "
                f"{self.cached_tokens}/{self.prefill_tokens} preemptions {self.preemptions}"
                f" | per step ms: overhead "
                f"{1e3 * self.overhead_s / n:.3f} overhead_p50 {1e3 * recent[len(recent) // 2]:.3f}"
                f" overhead_p99 {1e3 * recent[int(0.99 * (len(recent) - 1))]:.3f} waits: {waits}"
                f" | shard compute {1e3 * self.shard_compute_s / n:.3f} allreduce "
                f"{1e3 * self.shard_allreduce_s / n:.3f} | finished {dict(self.finished)}")
