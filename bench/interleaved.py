"""Decode steps of several engines interleaved in one process, so that a noisy machine slows them
alike (the way bench.gemm_backends and bench.decode_attention compare compiled variants).

Each engine holds `rows` sequences per context length, prefilled with the same prompt; every
round steps each context's sequences once on each engine, all fed the first engine's greedy
tokens. Reports median ms per step per (engine, context), steps with NaN logits, and how often
the engines' greedy tokens agree.
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def prompt(length: int, seed: int, vocab: int) -> tuple[int, ...]:
    return tuple((7 * i + 13 * seed) % (vocab - 1) + 1 for i in range(length))


def interleave(engines: dict[str, Any], contexts: list[int], rows: int, steps: int,
               vocab: int) -> dict[str, Any]:
    """engines: name -> ShardEngine (compiled ones are checked to have run every step so)."""
    from shard_svc.engine import SeqWork

    first = next(iter(engines))
    tokens: dict[tuple[str, int], list[int]] = {}
    for name, e in engines.items():
        for c, n in enumerate(contexts):
            work = [SeqWork(c * rows + r, prompt(n, r, vocab), True) for r in range(rows)]
            tokens[name, c] = [r.token_ids[0] for r in e.step(e.next_step_id, work).results]
    times: dict[tuple[str, int], list[float]] = {key: [] for key in tokens}
    nan = dict.fromkeys(tokens, 0)
    agree = dict.fromkeys(range(len(contexts)), 0)
    compiled_before = {name: e.compiled.steps if e.compiled else 0 for name, e in engines.items()}
    for _ in range(steps):
        for c in range(len(contexts)):
            feed = list(tokens[first, c])
            for name, e in engines.items():
                work = [SeqWork(c * rows + r, (feed[r],), False) for r in range(rows)]
                t0 = time.perf_counter()
                out = e.step(e.next_step_id, work).results
                times[name, c].append((time.perf_counter() - t0) * 1e3)
                tokens[name, c] = [r.token_ids[0] for r in out]
                nan[name, c] += any(v != v for r in out for v in r.logits)
            agree[c] += len({tuple(tokens[name, c]) for name in engines}) == 1
    for name, e in engines.items():
        ran = (e.compiled.steps if e.compiled else 0) - compiled_before[name]
        assert e.compiled is None or ran == steps * len(contexts), f"{name}: a step ran eager"
    return {"contexts": contexts, "rows": rows, "steps": steps,
            "steps_agreeing": [agree[c] for c in range(len(contexts))],
            "ms_per_step": {name: [statistics.median(times[name, c])
                                   for c in range(len(contexts))] for name in engines},
            "nan_steps": {name: [nan[name, c] for c in range(len(contexts))]
                          for name in engines}}
