"""The scheduler's on-demand KV pages and preemption, against a simulated shard cache (each
sequence's pages its own, or shared prefixes counted by a replica of the shards' page table)."""

from __future__ import annotations

import random

import pytest

from router_svc.scheduler import Scheduler, SchedulerConfig, StepPlan
from services.errors import InvalidArgument
from services.page_table import PageTable
from tests.unit.test_page_accounting import BruteCache


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


def simulate_shared(cfg: SchedulerConfig, prompts: dict[int, list[int]], max_new: dict[int, int],
                    arrivals: dict[int, list[int]], seed: int) -> dict[str, object]:
    """Drive steps like the engine, with a replica of the shards' page table in the scheduler
    and, as the shard, the brute-force cache of test_page_accounting: sequences share prefix
    pages. Checks after every step that the shard never needed a page it did not have and that
    the scheduler's free pages are the shard's."""
    rng = random.Random(seed)
    tokens = {rid: list(p) for rid, p in prompts.items()}  # prompt + generated so far
    sched = Scheduler(cfg, PageTable(cfg.kv_capacity_pages, cfg.kv_page_size),
                      lambda rid: tokens[rid])
    shard = BruteCache(cfg.kv_capacity_pages, cfg.kv_page_size)
    generated = dict.fromkeys(prompts, 0)
    first_admitted: list[int] = []
    ended: list[int] = []
    step = cached = 0
    while step <= max(arrivals) or sched.num_waiting or sched.num_running:
        sched.release(ended)  # as the engine: the ended sequences, before the plan
        for rid in ended:
            shard.release(rid)
        ended = []
        for rid in arrivals.get(step, []):
            sched.submit(rid, len(prompts[rid]), max_new[rid])
        plan = sched.schedule()
        for rid in plan.preempted:  # released by the scheduler's replica already
            shard.release(rid)
        first_admitted += [rid for rid in plan.prefill if generated[rid] == 0]
        work = [(rid, list(tokens[rid])) for rid in plan.prefill]
        work += [(rid, tokens[rid][-1:]) for rid in plan.decode]
        if work:
            free = shard.free_pages()
            sched.step_sent(work)
            taken, hits = shard.step(work)  # raises if it had to evict with nothing evictable
            sched.step_ran()
            assert taken <= free, "the shard ran out of pages"
            cached += sum(hits)
        assert sched.kv_pages_free == shard.free_pages()
        for rid, _ in work:
            tokens[rid].append(rng.randrange(3))
            generated[rid] += 1
            if generated[rid] == max_new[rid]:
                sched.finish(rid)
                ended.append(rid)
        step += 1
        assert step < 20_000, "the workload never drained"
    sched.release(ended)
    return {"generated": generated, "first_admitted": first_admitted, "cached": cached,
            "free": sched.kv_pages_free, "preemptions": sched.preemptions}


@pytest.mark.parametrize("seed", range(8))
def test_shared_prefixes_never_overflow_the_shards_and_match_their_free_pages(seed: int) -> None:
    rng = random.Random(seed)
    cfg = SchedulerConfig(kv_capacity_tokens=rng.choice([64, 160, 512]),
                          kv_page_size=rng.choice([2, 4, 16]), max_waiting=1000,
                          max_running=rng.randint(1, 12), prefill_token_budget=rng.randint(8, 200))
    cap = cfg.kv_capacity_pages * cfg.kv_page_size
    systems = [[rng.randrange(3) for _ in range(rng.randint(0, cap // 3))] for _ in range(2)]
    prompts: dict[int, list[int]] = {}
    max_new: dict[int, int] = {}
    for rid in range(60):
        prompt = rng.choice(systems) + [rng.randrange(3) for _ in range(rng.randint(1, 12))]
        prompts[rid] = prompt[:cap // 2]
        max_new[rid] = rng.randint(1, cap - len(prompts[rid]))
    arrivals: dict[int, list[int]] = {}
    for rid in prompts:
        arrivals.setdefault(rng.randint(0, 40), []).append(rid)
    out = simulate_shared(cfg, prompts, max_new, arrivals, seed)
    assert out["generated"] == max_new  # none failed or lost
    assert out["first_admitted"] == [rid for step in sorted(arrivals) for rid in arrivals[step]]
    assert out["free"] == cfg.kv_capacity_pages
    assert out["cached"] > 0


SYSTEM = list(range(100, 164))  # 64 tokens: 4 pages of 16
ASKS = {rid: SYSTEM + [rid] * 8 for rid in range(5)}  # 72 tokens: 4 shared pages and 1 own


def warm_scheduler(budget: int = 2048, shared: bool = True) -> tuple[Scheduler, PageTable]:
    """12 pages of 16 tokens; request 0 ran alone and ended, its pages cached."""
    cfg = SchedulerConfig(kv_capacity_tokens=192, kv_page_size=16, prefill_token_budget=budget)
    table = PageTable(cfg.kv_capacity_pages, cfg.kv_page_size)
    sched = Scheduler(cfg, table, ASKS.__getitem__) if shared else Scheduler(cfg)
    sched.submit(0, 72, 8)
    assert sched.schedule().prefill == (0,)
    sched.step_sent([(0, ASKS[0])])
    sched.step_ran()
    sched.finish(0)
    sched.release([0])
    return sched, table


def test_requests_sharing_a_prefix_are_admitted_together_where_unshared_counting_cannot() -> None:
    sched, table = warm_scheduler()
    for rid in range(1, 5):
        sched.submit(rid, 72, 8)  # 5 pages each unshared: 4 of them need 20 of the 12
    plan = sched.schedule()
    assert plan.prefill == (1, 2, 3, 4)  # the first takes the 4 cached pages and its own
    sched.step_sent([(rid, ASKS[rid]) for rid in plan.prefill])
    sched.step_ran()
    assert sched.kv_pages_used == 8 == table.num_pages - table.free_pages
    for length in range(73, 80):  # to 79 tokens: each still in its own fifth page
        plan = sched.schedule()
        assert (plan.decode, plan.preempted) == ((1, 2, 3, 4), ())
        sched.step_sent([(rid, [length]) for rid in plan.decode])
        sched.step_ran()
    assert sched.preemptions == 0
    unshared, _ = warm_scheduler(shared=False)
    for rid in range(1, 5):
        unshared.submit(rid, 72, 8)
    assert unshared.schedule().prefill == (1, 2)  # 10 of 12 pages


def test_the_prefill_budget_counts_only_the_tokens_to_compute() -> None:
    sched, _ = warm_scheduler(budget=32)  # 4 prompts of 8 uncached tokens
    for rid in range(1, 5):
        sched.submit(rid, 72, 8)
    assert sched.schedule().prefill == (1, 2, 3, 4)
    whole, _ = warm_scheduler(budget=32, shared=False)  # counted whole: one 72-token prompt
    for rid in range(1, 5):
        whole.submit(rid, 72, 8)
    assert whole.schedule().prefill == (1,)
