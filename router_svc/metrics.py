"""Prometheus metrics for the router, named `cpumesh_*` after vLLM's and TGI's conventions.

    metrics = RouterMetrics(engine)          # its own CollectorRegistry, never the global one
    body = metrics.exposition()              # text format, for GET /metrics

Request and step events come from the engine's stats listeners (`EngineStats.listeners`); the
gauges (requests waiting and running, KV tokens and pages used and free, the prefix cache's hit
rate, serving) are read from the engine when scraped. Time to first token and inter-token
latency are measured when tokens are sampled (the text follows one step later, after
detokenization); queue time runs from arrival until the step that prefills the prompt is sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from router_svc.shards import StepResult

if TYPE_CHECKING:
    from router_svc.engine import Engine
    from router_svc.sequence import Sequence, Usage

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds; like vLLM's, from a few milliseconds (a tiny model's decode step) up to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
REFUSAL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouterMetrics:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("cpumesh_time_to_first_token_seconds",
                              "Time from arrival to the first sampled token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("cpumesh_inter_token_latency_seconds",
                             "Time between two sampled tokens of one request.",
                             buckets=STEP_BUCKETS, registry=r)
        self.e2e = Histogram("cpumesh_e2e_request_latency_seconds",
                             "Time from arrival to the request's end, whatever the outcome.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("cpumesh_request_queue_time_seconds",
                               "Time from arrival until the step prefilling the prompt is sent.",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("cpumesh_step_duration_seconds",
                              "Wall time of one engine step.", buckets=STEP_BUCKETS, registry=r)
        self.step_part = Histogram("cpumesh_step_part_seconds",
                                   "One step's time by part: shard_compute (the slowest shard), "
                                   "allreduce_wait (the slowest shard), router_overhead "
                                   "(engine time not spent awaiting shards or tokenizer).",
                                   ["part"], buckets=STEP_BUCKETS, registry=r)
        self.step_batch = Histogram("cpumesh_step_batch_size", "Sequences in one step.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.steps = Counter("cpumesh_steps", "Engine steps run.", registry=r)
        self.refusal = Histogram("cpumesh_refusal_seconds",
                                 "Requests refused before any work (RESOURCE_EXHAUSTED, HTTP "
                                 "429: waiting queue full, too many requests or bytes in "
                                 "flight): time from the handler's start to the status sent, "
                                 "by api (grpc, http).", ["api"], buckets=REFUSAL_BUCKETS,
                                 registry=r)
        self.step_failures = Counter("cpumesh_step_failures",
                                     "Steps (or health checks) that failed the shard group.",
                                     registry=r)
        self.finished = Counter("cpumesh_requests", "Requests ended, by outcome: stop, length, "
                                "cancelled, error.", ["outcome"], registry=r)
        self.prompt_tokens = Counter("cpumesh_prompt_tokens", "Prompt tokens prefilled.",
                                     registry=r)
        self.generation_tokens = Counter("cpumesh_generation_tokens", "Tokens generated.",
                                         registry=r)
        self.preemptions = Counter("cpumesh_preemptions", "Running sequences preempted because "
                                   "the KV cache was full (recomputed later, never failed).",
                                   registry=r)
        self.prefix_queried = Counter("cpumesh_prefix_cache_queried_tokens",
                                      "Tokens prefilled (prompts, and recomputed sequences).",
                                      registry=r)
        self.prefix_hits = Counter("cpumesh_prefix_cache_hit_tokens",
                                   "Of those, tokens whose KV the shards reused from their "
                                   "prefix cache.", registry=r)
        Gauge("cpumesh_prefix_cache_hit_rate", "Prefix cache hit tokens / queried tokens since "
              "the router started.", registry=r).set_function(
            lambda: engine.stats.cached_tokens / max(1, engine.stats.prefill_tokens))
        for outcome in ("stop", "length", "cancelled", "error"):
            self.finished.labels(outcome)  # present at zero from the start
        for part in ("shard_compute", "allreduce_wait", "router_overhead"):
            self.step_part.labels(part)
        for api in ("grpc", "http"):
            self.refusal.labels(api)
        gauges = {
            "cpumesh_num_requests_waiting": ("Requests queued, not yet prefilled.", "num_waiting"),
            "cpumesh_num_requests_running": ("Requests in the running batch.", "num_running"),
            "cpumesh_kv_cache_tokens_used": ("KV cache tokens held by running requests (in "
                                             "whole pages, shared prefix pages once).",
                                             "kv_tokens_reserved"),
            "cpumesh_kv_cache_tokens_free": ("KV cache tokens free to admit requests.",
                                             "kv_tokens_free"),
            "cpumesh_kv_cache_pages_used": ("KV cache pages held by running requests.",
                                            "kv_pages_used"),
            "cpumesh_kv_cache_pages_free": ("KV cache pages free.", "kv_pages_free"),
        }
        for name, (doc, attr) in gauges.items():
            Gauge(name, doc, registry=r).set_function(self._scheduler_reader(attr))
        Gauge("cpumesh_serving", "1 while every shard serves, else 0.",
              registry=r).set_function(lambda: float(engine.serving))
        self._last_token: dict[int, float] = {}
        engine.stats.listeners.append(self)

    def _scheduler_reader(self, attr: str):  # type: ignore[no-untyped-def]
        def read() -> float:
            scheduler = self.engine.scheduler
            return 0.0 if scheduler is None else float(getattr(scheduler, attr))
        return read

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- EngineStats listener ---------------------------------------------------------------

    def on_step(self, batch: int, result: StepResult, wall_s: float, overhead_s: float) -> None:
        self.steps.inc()
        self.prefix_queried.inc(result.prefill_tokens)
        self.prefix_hits.inc(result.cached_tokens)
        self.step.observe(wall_s)
        self.step_batch.observe(batch)
        self.step_part.labels("shard_compute").observe(result.compute_s)
        self.step_part.labels("allreduce_wait").observe(result.allreduce_s)
        self.step_part.labels("router_overhead").observe(max(0.0, overhead_s))

    def on_scheduled(self, seq: Sequence, now: float) -> None:
        self.queue.observe(max(0.0, now - seq.arrival))
        self.prompt_tokens.inc(len(seq.prompt_ids))

    def on_sampled(self, seq: Sequence, now: float) -> None:
        self.generation_tokens.inc()
        last = self._last_token.get(seq.seq_id)
        if last is None:
            self.ttft.observe(max(0.0, now - seq.arrival))
        else:
            self.itl.observe(max(0.0, now - last))
        self._last_token[seq.seq_id] = now

    def on_ended(self, seq: Sequence, usage: Usage) -> None:
        self._last_token.pop(seq.seq_id, None)
        self.e2e.observe(usage.total_s)
        if seq.finish is not None:
            self.finished.labels(seq.finish.reason.value).inc()

    def on_failure(self) -> None:
        self.step_failures.inc()

    def on_preempted(self, count: int) -> None:
        self.preemptions.inc(count)

    def on_refused(self, api: str, seconds: float) -> None:
        self.refusal.labels(api).observe(seconds)
