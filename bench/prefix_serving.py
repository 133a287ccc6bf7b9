"""Serving capacity before and after on-demand KV pages and prefix caching (issue 18), in one run.

    python -m bench.prefix_serving [--tp 2] [--users 64] [--duration 45] [--conversations 6]

Two cpumesh clusters (tokenizer, `tp` shards, router; KV 16384 tokens, context 1024), one after
the other, on the same machine and workload:

* before: `--kv-reservation full --default-max-new-tokens 1024` on the router and
  `--prefix-cache off` on the shards: a request without max_new_tokens reserves KV up to the
  context at admission and every prompt is computed whole (the behaviour before issue 18);
* after: the defaults (pages on demand with preemption, prefix cache on).

Workload 1, load: `--users` closed-loop users send chats (a shared ~300-token system prompt and
a question of their own) without max_new_tokens, greedy; answers end at EOS. Reports TTFT and
end-to-end percentiles, throughput, goodput (TTFT <= 2 s and mean ITL <= 0.5 s) and errors.
Workload 2, multi-turn: one at a time, `--conversations` chats (each its own system prompt) get a
first turn, then a second turn carrying the first's answer; each second turn is compared with
the same messages under another conversation's id (the same length, nothing cached). Writes
JSON (bench/results/prefix_serving.json) and prints the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from tests.procs import Service, free_ports, wait_serving
from tools.client import RouterClient
from tools.loadtest import WORDS, LoadConfig, summarize
from tools.loadtest_clients import Sample, Timeline

BEFORE = {"router": ("--kv-reservation", "full", "--default-max-new-tokens", "1024"),
          "shard": ("--prefix-cache", "off")}
AFTER: dict[str, tuple[str, ...]] = {"router": (), "shard": ()}
QUESTIONS = ["What is a library?", "Why is the sky blue?", "What do bees make?",
             "Name a large ocean.", "What is rain?", "Why do we sleep?", "What is a river?",
             "What do cows eat?", "What is the sun?", "Why do birds sing?"]


ANSWERS = {"sentence": "Answer in one short sentence.", "words": "Answer in a few words."}


def system_prompt(answer: str = "sentence", words: int = 280, seed: int = 18) -> str:
    rng = random.Random(seed)
    notes = " ".join(rng.choice(WORDS) for _ in range(words))
    return (f"You are the help desk of a small town. {ANSWERS[answer]} Notes you may "
            f"use: {notes}.")


@contextlib.contextmanager
def cluster(model_dir: Path, tp: int, cores: int, log_dir: Path, extra: dict[str, tuple[str, ...]],
            dtype: str) -> Iterator[tuple[str, str]]:
    """Yields the router's gRPC address and its /metrics URL."""
    ports = free_ports(3 + 2 * tp)
    metrics = f"http://127.0.0.1:{ports.pop()}"
    tok, router = (f"127.0.0.1:{p}" for p in ports[:2])
    shards = [f"127.0.0.1:{p}" for p in ports[2:2 + tp]]
    peers = ",".join(f"127.0.0.1:{p}" for p in ports[2 + tp:])
    services = [Service("tokenizer", ["-m", "tokenizer_svc", "--model-dir", str(model_dir),
                                      "--listen", tok], log_dir)]
    services += [Service(f"shard{r}", [
        "-m", "shard_svc", "--model-dir", str(model_dir), "--tp-size", str(tp), "--tp-rank",
        str(r), "--peers", peers, "--listen", a, "--threads", str(max(1, cores // tp)),
        "--kv-capacity-tokens", "16384", "--max-context", "1024", "--mesh-timeout", "120",
        "--dtype", dtype, *extra["shard"]], log_dir) for r, a in enumerate(shards)]
    services.append(Service("router", [
        "-m", "router_svc", "--tokenizer", tok, "--shards", ",".join(shards), "--listen", router,
        "--max-running", "64", "--max-waiting", "256", "--step-timeout", "120",
        "--http-listen", metrics.removeprefix("http://"), *extra["router"]], log_dir))
    try:
        for s in services:
            s.start()
        wait_serving(router, services[-1], deadline_s=300)
        yield router, metrics + "/metrics"
    finally:
        for s in reversed(services):
            s.stop()


def router_counters(url: str) -> dict[str, float]:
    """The router's preemptions and prefix-cache tokens, from /metrics."""
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    names = ("cpumesh_preemptions_total", "cpumesh_prefix_cache_queried_tokens_total",
             "cpumesh_prefix_cache_hit_tokens_total")
    return {n: float(line.split()[1]) for line in body.splitlines() for n in names
            if line.startswith(n + " ")}


async def chat(client: RouterClient, messages: list[tuple[str, str]], timeout_s: float,
               **params: Any) -> tuple[Sample, str, int]:
    """One greedy chat request: its timings, its text and its prompt's token count."""
    line, text, prompt_tokens = Timeline(), [], 0
    try:
        async for r in client.generate(None, messages=messages, temperature=0.0,
                                       timeout=timeout_s, **params):
            line.tokens(len(r.token_ids))
            text.append(r.text)
            if r.HasField("usage"):
                prompt_tokens = r.usage.prompt_tokens
    except grpc.aio.AioRpcError as e:
        return line.done(False, e.code().name), "", 0
    return line.done(), "".join(text), prompt_tokens


async def load(router: str, system: str, users: int, duration_s: float, requests: int
               ) -> dict[str, Any]:
    """Closed loop: each user sends its next chat when the last one ends."""
    samples: list[Sample] = []
    issued = 0
    t0 = time.perf_counter()
    async with RouterClient(router) as client:
        async def user(u: int) -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() - t0 < duration_s:
                issued += 1
                question = f"{QUESTIONS[(u + issued) % len(QUESTIONS)]} (user {u})"
                sample, _, _ = await chat(client, [("system", system), ("user", question)], 600)
                samples.append(sample)
        await asyncio.gather(*(user(u) for u in range(users)))
    cfg = LoadConfig(f"grpc://{router}", users=users, requests=requests, duration_s=duration_s)
    return summarize(cfg, samples, time.perf_counter() - t0)


def history(system: str, cid: int, question: str, answer: str = "") -> list[tuple[str, str]]:
    """A two-turn chat of conversation `cid` (its id first: nothing shared with another's)."""
    return [("system", f"Conversation {cid}. {system}"), ("user", question),
            ("assistant", answer), ("user", "Say it again in other words.")]


async def multi_turn(router: str, system: str, conversations: int) -> dict[str, Any]:
    """Second turns (history cached) against the same messages under a fresh id (cold)."""
    rows = []
    async with RouterClient(router) as client:
        for i in range(conversations):
            question = QUESTIONS[i % len(QUESTIONS)]
            first, answer, _ = await chat(client, history(system, 100 + i, question)[:2], 120,
                                          max_new_tokens=48)
            second, _, n2 = await chat(client, history(system, 100 + i, question, answer), 120,
                                       max_new_tokens=8)
            cold, _, n_cold = await chat(client, history(system, 900 + i, question, answer),
                                         120, max_new_tokens=8)
            rows.append({"first_ttft_s": first.ttft_s, "second_ttft_s": second.ttft_s,
                         "cold_ttft_s": cold.ttft_s, "second_prompt_tokens": n2,
                         "cold_prompt_tokens": n_cold})
    second = statistics.median(r["second_ttft_s"] for r in rows)
    cold = statistics.median(r["cold_ttft_s"] for r in rows)
    return {"conversations": rows, "second_ttft_p50_s": second, "cold_ttft_p50_s": cold,
            "second_over_cold": second / cold}


def run(model_dir: Path, tp: int, cores: int, users: int, duration_s: float, requests: int,
        conversations: int, dtype: str, answer: str = "sentence") -> dict[str, Any]:
    system = system_prompt(answer)
    out: dict[str, Any] = {"tp": tp, "users": users, "duration_s": duration_s, "dtype": dtype,
                           "load_average_start": os.getloadavg()[0],
                           "answer": ANSWERS[answer]}
    with tempfile.TemporaryDirectory() as logs:
        for name, extra in (("before", BEFORE), ("after", AFTER)):
            with cluster(model_dir, tp, cores, Path(logs), extra, dtype) as (router, url):
                out[name] = {"flags": extra,
                             "load": asyncio.run(load(router, system, users, duration_s,
                                                      requests)),
                             "load_router": router_counters(url),
                             "multi_turn": asyncio.run(multi_turn(router, system,
                                                                  conversations))}
    b, a = out["before"]["load"], out["after"]["load"]
    out["ttft_p50_after_over_before"] = a["ttft_s"]["p50"] / b["ttft_s"]["p50"]
    out["goodput_after_over_before"] = (a["goodput_requests_per_s"] / b["goodput_requests_per_s"]
                                        if b["goodput_requests_per_s"] else None)
    return out


def report(r: dict[str, Any]) -> str:
    lines = [f"cpumesh tp {r['tp']}, {r['dtype']}, {r['users']} users, shared system prompt "
             f"({r['answer']!r})"]
    for name in ("before", "after"):
        ld, mt, c = r[name]["load"], r[name]["multi_turn"], r[name]["load_router"]
        lines.append(
            f"  {name:6}: {ld['ok']}/{ld['requests']} ok, errors {ld['errors'] or 'none'}; "
            f"TTFT p50 {ld['ttft_s']['p50']:.3f} s p90 {ld['ttft_s']['p90']:.3f} s; "
            f"{ld['tokens_per_s']:.1f} tokens/s, {ld['requests_per_s']:.2f} req/s, goodput "
            f"{ld['goodput_requests_per_s']:.2f} req/s; 2nd-turn TTFT p50 "
            f"{mt['second_ttft_p50_s']:.3f} s vs cold {mt['cold_ttft_p50_s']:.3f} s "
            f"({mt['second_over_cold']:.2f}x); output {ld['output_tokens_per_request']:.0f} "
            f"tokens/request; preemptions {c['cpumesh_preemptions_total']:.0f}, prefix hits "
            f"{c['cpumesh_prefix_cache_hit_tokens_total']:.0f}/"
            f"{c['cpumesh_prefix_cache_queried_tokens_total']:.0f} tokens")
    goodput = r["goodput_after_over_before"]
    lines.append(f"  after/before: TTFT p50 {r['ttft_p50_after_over_before']:.2f}x, goodput "
                 + ("inf (none before met the objective)" if goodput is None
                    else f"{goodput:.2f}x"))
    return "\n".join(lines)


def section(results: dict[str, dict[str, Any]]) -> list[str]:
    """BENCHMARKS.md's section from bench/results/prefix_serving*.json (name -> result), the
    default run's targets judged."""
    out = ["## Serving capacity: KV pages on demand, preemption, prefix cache (issue 18)", "",
           "`python -m bench.prefix_serving` (SmolLM2, tp 2 on 2 cores, KV 16384 tokens, context "
           "1024): *before* is the router with `--kv-reservation full --default-max-new-tokens "
           "1024` and shards with `--prefix-cache off` (the behaviour before issue 18), *after* "
           "the defaults. 64 closed-loop users send chats with a shared ~300-token system prompt "
           "and no max_new_tokens, greedy, for 45 s; goodput counts requests with TTFT <= 2 s and "
           "mean inter-token latency <= 0.5 s. Multi-turn: the second turn of 6 chats against the "
           "same messages under another conversation (same length, nothing cached), one at a time.",
           "", "| results | dtype | run | ok / sent | errors | TTFT p50 / p90 s | tokens/s | "
           "req/s | goodput req/s | preemptions | prefix hits | 2nd turn / cold TTFT |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for run_name in ("before", "after"):
            ld, mt, c = r[run_name]["load"], r[run_name]["multi_turn"], r[run_name]["load_router"]
            out.append(
                f"| {name} | {r['dtype']} | {run_name} | {ld['ok']} / {ld['requests']} | "
                f"{ld['errors'] or 'none'} | {ld['ttft_s']['p50']:.2f} / "
                f"{ld['ttft_s']['p90']:.2f} | "
                f"{ld['tokens_per_s']:.1f} | {ld['requests_per_s']:.2f} | "
                f"{ld['goodput_requests_per_s']:.2f} | {c['cpumesh_preemptions_total']:.0f} | "
                f"{c['cpumesh_prefix_cache_hit_tokens_total']:.0f} / "
                f"{c['cpumesh_prefix_cache_queried_tokens_total']:.0f} | "
                f"{mt['second_ttft_p50_s']:.3f} / {mt['cold_ttft_p50_s']:.3f} s "
                f"({mt['second_over_cold']:.2f}x) |")
    r = results.get("prefix_serving") or next(iter(results.values()))
    b, a = r["before"]["load"], r["after"]["load"]
    goodput = r["goodput_after_over_before"]
    errors = b["errors"] or a["errors"] or b["ok"] < b["requests"] or a["ok"] < a["requests"]
    checks = [
        (r["ttft_p50_after_over_before"] <= 0.3,
         f"TTFT p50 after / before: {r['ttft_p50_after_over_before']:.2f}x (target <= 0.3)"),
        (a["goodput_requests_per_s"] >= 2 * b["goodput_requests_per_s"] > 0
         or (b["goodput_requests_per_s"] == 0 < a["goodput_requests_per_s"]),
         "goodput after / before: " + (f"{goodput:.2f}x" if goodput is not None else
                                       f"{a['goodput_requests_per_s']:.2f} req/s against none "
                                       "before") + " (target >= 2x)"),
        (not errors, f"errors: {'none' if not errors else 'some'} (target none)"),
        (r["after"]["multi_turn"]["second_over_cold"] <= 0.3,
         f"second-turn TTFT / first-turn (cold) TTFT at the same length: "
         f"{r['after']['multi_turn']['second_over_cold']:.2f}x (target <= 0.3)")]
    out += [""] + [f"- {'PASS' if ok else 'MISS'} {text}" for ok, text in checks]
    return [*out, "", "Targets judged on the first row pair (`prefix_serving.json`); the other "
                  "files are earlier runs with other settings (names say which).", ""]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--duration", type=float, default=45.0, help="seconds of issuing, per run")
    p.add_argument("--requests", type=int, default=1000, help="most requests per run")
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--answer", default="sentence", choices=sorted(ANSWERS),
                   help="what the system prompt asks of the answers' length")
    p.add_argument("--out", type=Path, default=Path("bench/results/prefix_serving.json"))
    a = p.parse_args(argv)
    if a.model_dir is None:
        from model_formats.embedded import default_model_dir
        a.model_dir = default_model_dir()
    result = run(a.model_dir, a.tp, a.cores, a.users, a.duration, a.requests, a.conversations,
                 a.dtype, a.answer)
    a.out.write_text(json.dumps(result, indent=2))
    print(report(result))


if __name__ == "__main__":
    main()
