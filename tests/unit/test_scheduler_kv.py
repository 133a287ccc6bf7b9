"""The scheduler's on-demand KV pages and preemption, against a simulated shard cache."""

from __future__ import annotations

import random

import pytest

from router_svc.scheduler import Scheduler, SchedulerConfig, StepPlan
from services.errors import InvalidArgument


def pages(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def simulate(cfg: SchedulerConfig, work: dict[int, tuple[int, int]],
             arrivals: dict[int, list[int]]) -> dict[str, object]:
    """Drive steps like the engine, with a shard cache that holds each running sequence's
    tokens: prefill puts prompt (+ tokens generated before a preemption) in, decode one more;
    a preempted sequence is released before the step. Each request ends after generating its
    max_new tokens. Checks after every step that the shard never holds more pages than it has."""
    sched = Scheduler(cfg)
    generated = dict.fromkeys(work, 0)
    in_cache: dict[int, int] = {}  # request → tokens in the shard cache
    first_admitted: list[int] = []
    preempted_seen = 0
    step = 0
    while step <= max(arrivals) or sched.num_waiting or sched.num_running:
        for rid in arrivals.get(step, []):
            sched.submit(rid, *work[rid])
        plan = sched.schedule()
        for rid in plan.preempted:  # released before the step, as the engine does
            assert generated[rid] > 0
            del in_cache[rid]
            preempted_seen += 1
        for rid in plan.decode:
            in_cache[rid] += 1
        for rid in plan.prefill:
            assert rid not in in_cache
            in_cache[rid] = work[rid][0] + generated[rid]  # the prompt and what it generated
            if generated[rid] == 0:
                first_admitted.append(rid)
        held = sum(pages(n, cfg.kv_page_size) for n in in_cache.values())
        assert held <= cfg.kv_capacity_pages, "the shard ran out of pages"
        assert sched.kv_tokens_reserved == held * cfg.kv_page_size
        for rid in (*plan.decode, *plan.prefill):
            generated[rid] += 1
            if generated[rid] == work[rid][1]:
                sched.finish(rid)
                del in_cache[rid]
        step += 1
        assert step < 20_000, "the workload never drained"
    assert sched.preemptions == preempted_seen
    return {"generated": generated, "first_admitted": first_admitted, "steps": step,
            "preemptions": preempted_seen, "free": sched.kv_tokens_free}


@pytest.mark.parametrize("seed", range(8))
def test_random_workloads_finish_without_overflowing_the_cache(seed: int) -> None:
    rng = random.Random(seed)
    cfg = SchedulerConfig(kv_capacity_tokens=rng.choice([64, 160, 512]),
                          kv_page_size=rng.choice([1, 4, 16]), max_waiting=1000,
                          max_running=rng.randint(1, 12), prefill_token_budget=rng.randint(8, 200))
    cap = cfg.kv_capacity_pages * cfg.kv_page_size
    work: dict[int, tuple[int, int]] = {}
    for rid in range(60):
        prompt = rng.randint(1, cap // 2)
        work[rid] = (prompt, rng.randint(1, cap - prompt))
    arrivals: dict[int, list[int]] = {}
    for rid in work:
        arrivals.setdefault(rng.randint(0, 40), []).append(rid)
    out = simulate(cfg, work, arrivals)
    assert out["generated"] == {rid: n for rid, (_, n) in work.items()}  # none failed or lost
    order = [rid for step in sorted(arrivals) for rid in arrivals[step]]
    assert out["first_admitted"] == order  # FIFO by arrival
    assert out["free"] == cap


def test_the_newest_is_preempted_and_recomputed_first() -> None:
    sched = Scheduler(SchedulerConfig(kv_capacity_tokens=64, kv_page_size=16))  # 4 pages
    sched.submit(1, 20, 40)  # its prompt and one more token: 2 pages
    sched.submit(2, 10, 40)  # 1 page
    sched.submit(3, 20, 5)  # 2 pages: would need a fifth
    assert sched.schedule().prefill == (1, 2)
    assert sched.kv_tokens_reserved == 48  # 20 and 10 tokens
    for _ in range(12):  # 1 grows to 32 tokens, 2 to 22: 2 + 2 pages
        plan = sched.schedule()
        assert plan.decode == (1, 2) and not plan.preempted
    plan = sched.schedule()  # 1's 33rd token needs a third page: 2, the newest, goes
    assert (plan.decode, plan.preempted, plan.prefill) == ((1,), (2,), ())
    assert sched.num_waiting == 2 and sched.preemptions == 1
    for _ in range(26):  # 1 generates its 40 tokens (1 at prefill, 39 decoding)
        assert sched.schedule() == StepPlan(prefill=(), decode=(1,))
    assert sched.finish(1)
    plan = sched.schedule()  # 2 first, ahead of 3: prompt 10 + 13 generated = 23 tokens
    assert plan.prefill == (2, 3) and not plan.decode
    assert sched.kv_tokens_reserved == 64  # 23 and 20 tokens: 2 + 2 pages


def test_on_demand_admits_what_a_full_reservation_serializes() -> None:
    def admitted(kv_reservation: str) -> int:
        sched = Scheduler(SchedulerConfig(kv_capacity_tokens=16384,
                                          kv_reservation=kv_reservation))
        for rid in range(64):
            sched.submit(rid, 300, 2000)  # as a request without max_new_tokens once reserved
        return len(sched.schedule().prefill) + len(sched.schedule().prefill)

    assert admitted("full") == 7  # 144 pages each of 1024
    assert admitted("on_demand") == 12  # 6 prompts a step: the prefill budget bounds it


def test_a_request_too_long_for_the_whole_cache_is_refused_with_the_numbers() -> None:
    sched = Scheduler(SchedulerConfig(kv_capacity_tokens=100, kv_page_size=16))
    with pytest.raises(InvalidArgument, match=r"= 97 tokens can never fit the KV cache \(96"):
        sched.submit(1, 90, 7)
    sched.submit(1, 90, 6)  # exactly the 96 tokens: runs alone, never preempted
    assert sched.schedule().prefill == (1,)
    for _ in range(5):
        assert sched.schedule().decode == (1,)


def test_finish_and_abort_free_every_page() -> None:
    sched = Scheduler(SchedulerConfig(kv_capacity_tokens=256, kv_page_size=16))
    for rid in range(4):
        sched.submit(rid, 30, 10)
    sched.schedule()
    sched.schedule()
    assert sched.kv_tokens_reserved == 4 * 32
    assert sched.finish(0) and sched.kv_tokens_reserved == 3 * 32
    sched.abort_all()
    assert (sched.kv_tokens_reserved, sched.kv_tokens_free) == (0, 256)
