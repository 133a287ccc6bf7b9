"""The continuous-batching scheduler against a model of its rules, over random workloads."""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from router_svc.scheduler import Scheduler, SchedulerConfig, StepPlan
from services.errors import InvalidArgument, ResourceExhausted


def pages(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


class SchedulerMachine(RuleBasedStateMachine):
    """Random submit / schedule / finish / abort sequences; a plain model tracks what must hold
    (KV reserved up front: `kv_reservation="full"`; on demand: test_scheduler_kv.py)."""

    @initialize(capacity=st.integers(1, 400), page_size=st.sampled_from([1, 4, 16]),
                max_waiting=st.integers(1, 8), max_running=st.integers(1, 6),
                budget=st.integers(1, 120))
    def setup(self, capacity: int, page_size: int, max_waiting: int, max_running: int,
              budget: int) -> None:
        self.cfg = SchedulerConfig(kv_capacity_tokens=max(capacity, page_size),
                                   kv_page_size=page_size, max_waiting=max_waiting,
                                   max_running=max_running, prefill_token_budget=budget,
                                   kv_reservation="full")
        self.sched = Scheduler(self.cfg)
        self.next_id = 0
        self.waiting: dict[int, tuple[int, int]] = {}  # id -> (prompt_len, pages), FIFO
        self.running: dict[int, int] = {}  # id -> pages
        self.admitted: list[int] = []
        self.finished: list[int] = []

    @property
    def cap_pages(self) -> int:
        return self.cfg.kv_capacity_tokens // self.cfg.kv_page_size

    @rule(prompt_len=st.integers(1, 150), max_new=st.integers(1, 150))
    def submit(self, prompt_len: int, max_new: int) -> None:
        rid, self.next_id = self.next_id, self.next_id + 1
        need = pages(prompt_len + max_new, self.cfg.kv_page_size)
        if need > self.cap_pages:
            with pytest.raises(InvalidArgument, match=f"{prompt_len + max_new} tokens"):
                self.sched.submit(rid, prompt_len, max_new)
        elif len(self.waiting) >= self.cfg.max_waiting:
            with pytest.raises(ResourceExhausted,
                               match=rf"waiting queue full \({self.cfg.max_waiting} requests\)"):
                self.sched.submit(rid, prompt_len, max_new)
        else:
            self.sched.submit(rid, prompt_len, max_new)
            self.waiting[rid] = (prompt_len, need)

    @rule()
    def schedule(self) -> None:
        was_running, was_waiting = dict(self.running), bool(self.waiting)
        plan = self.sched.schedule()
        assert set(plan.decode) == set(was_running)  # everything prefilled decodes
        order = list(self.waiting)
        assert list(plan.prefill) == order[: len(plan.prefill)]  # FIFO, nobody overtakes
        prompts = [self.waiting[r][0] for r in plan.prefill]
        assert len(prompts) <= 1 or sum(prompts) <= self.cfg.prefill_token_budget
        for rid in plan.prefill:
            self.running[rid] = self.waiting.pop(rid)[1]
            self.admitted.append(rid)
        if self.waiting:  # the head stays only if it truly cannot be admitted now
            head_prompt, head_pages = next(iter(self.waiting.values()))
            assert (len(self.running) >= self.cfg.max_running
                    or sum(self.running.values()) + head_pages > self.cap_pages
                    or (prompts and sum(prompts) + head_prompt > self.cfg.prefill_token_budget))
        if was_waiting and not was_running:
            assert plan.prefill  # progress: an idle engine always admits the head

    @precondition(lambda self: self.waiting or self.running)
    @rule(data=st.data())
    def finish_known(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted([*self.waiting, *self.running])))
        free_before = self.sched.kv_tokens_free
        assert self.sched.finish(rid)
        freed = self.running.pop(rid, 0)
        self.waiting.pop(rid, None)
        assert self.sched.kv_tokens_free - free_before == freed * self.cfg.kv_page_size
        self.finished.append(rid)

    @rule(rid=st.integers(-5, 0))
    def finish_unknown_is_a_no_op(self, rid: int) -> None:
        known = rid in self.waiting or rid in self.running
        before = (self.sched.num_waiting, self.sched.num_running, self.sched.kv_tokens_free)
        if not known:
            assert not self.sched.finish(rid)
            assert (self.sched.num_waiting, self.sched.num_running,
                    self.sched.kv_tokens_free) == before

    @rule()
    def finish_twice(self) -> None:
        if self.finished:
            assert not self.sched.finish(self.finished[-1])

    @precondition(lambda self: self.next_id % 7 == 6)
    @rule()
    def abort_all(self) -> None:
        assert sorted(self.sched.abort_all()) == sorted([*self.waiting, *self.running])
        self.waiting.clear()
        self.running.clear()

    @invariant()
    def accounting(self) -> None:
        s = self.sched
        reserved = sum(self.running.values()) * self.cfg.kv_page_size
        assert s.kv_tokens_reserved == reserved <= s.kv_capacity_tokens
        assert s.kv_tokens_free + s.kv_tokens_reserved == s.kv_capacity_tokens
        assert s.kv_capacity_tokens <= self.cfg.kv_capacity_tokens
        assert s.num_running == len(self.running) <= self.cfg.max_running
        assert s.num_waiting == len(self.waiting) <= self.cfg.max_waiting

    @invariant()
    def admission_is_in_submission_order(self) -> None:
        assert self.admitted == sorted(self.admitted)


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def run_to_completion(sched: Scheduler, work: dict[int, tuple[int, int]],
                      arrivals: dict[int, list[int]]) -> tuple[list[int], dict[int, int]]:
    """Drive steps: requests arrive at their step; each running one finishes after max_new
    decode steps. Returns the admission order and each request's admission step."""
    left: dict[int, int] = {}
    order: list[int] = []
    admitted_at: dict[int, int] = {}
    step = 0
    while step <= max(arrivals) or sched.num_waiting or sched.num_running:
        for rid in arrivals.get(step, []):
            sched.submit(rid, *work[rid])
        plan = sched.schedule()
        for rid in plan.decode:
            left[rid] -= 1
            if left[rid] == 0:
                sched.finish(rid)
        for rid in plan.prefill:
            order.append(rid)
            admitted_at[rid] = step
            left[rid] = work[rid][1] - 1  # the prefill step yields the first token
            if left[rid] == 0:
                sched.finish(rid)
        step += 1
        assert step < 10_000, "the workload never drained"
    return order, admitted_at


@pytest.mark.parametrize("seed", range(5))
def test_no_starvation_a_large_request_amid_a_stream_of_small_ones(seed: int) -> None:
    rng = random.Random(seed)
    cfg = SchedulerConfig(kv_capacity_tokens=1024, kv_page_size=16, max_waiting=1000,
                          max_running=8, prefill_token_budget=256, kv_reservation="full")
    work = {rid: (rng.randint(1, 64), rng.randint(1, 32)) for rid in range(300)}
    work[20] = (900, 100)  # nearly the whole cache, and more than the prefill budget
    arrivals: dict[int, list[int]] = {}
    for rid in work:
        arrivals.setdefault(rid // 3, []).append(rid)
    order, admitted_at = run_to_completion(Scheduler(cfg), work, arrivals)
    assert order == sorted(work)  # FIFO, and every request was admitted
    # the large one waits at most for the requests ahead of it to finish
    assert admitted_at[20] - 20 // 3 <= max(n for _, n in work.values()) + 1


def test_prefill_budget_and_oversized_prompt_runs_alone() -> None:
    sched = Scheduler(SchedulerConfig(kv_capacity_tokens=4096, kv_page_size=16,
                                      prefill_token_budget=100))
    for rid, prompt in enumerate([40, 50, 20, 300, 10]):
        sched.submit(rid, prompt, 8)
    assert sched.schedule().prefill == (0, 1)  # 40 + 50; 20 more would exceed 100
    assert sched.schedule().prefill == (2,)  # 300 does not fit behind 20 in the same step
    plan = sched.schedule()
    assert plan.prefill == (3,) and plan.decode == (0, 1, 2)  # over budget, so alone
    assert sched.schedule().prefill == (4,)


def test_kv_reservation_is_whole_pages_and_finish_frees() -> None:
    sched = Scheduler(SchedulerConfig(kv_capacity_tokens=100, kv_page_size=16,
                                      kv_reservation="full"))
    assert sched.kv_capacity_tokens == 96  # rounded down to whole pages
    sched.submit(1, 10, 7)  # 17 tokens: 2 pages
    sched.submit(2, 30, 30)  # 60 tokens: 4 pages
    sched.submit(3, 1, 1)  # 1 page: does not fit behind 2 + 4 of 6 pages
    assert sched.kv_tokens_reserved == 0  # waiting requests reserve nothing
    assert sched.schedule().prefill == (1, 2)
    assert (sched.kv_tokens_reserved, sched.kv_tokens_free) == (96, 0)
    assert sched.schedule().prefill == ()
    assert sched.finish(1) and not sched.finish(1)
    assert sched.kv_tokens_free == 32
    assert sched.schedule().prefill == (3,)
    assert sched.finish(3) and sched.finish(2)
    assert (sched.kv_tokens_reserved, sched.num_running, sched.num_waiting) == (0, 0, 0)


def test_max_running_and_finishing_a_waiting_request() -> None:
    sched = Scheduler(SchedulerConfig(kv_capacity_tokens=10_000, max_running=2))
    for rid in range(4):
        sched.submit(rid, 5, 5)
    assert sched.schedule().prefill == (0, 1)
    assert sched.finish(2)  # still waiting: just dropped
    assert 2 not in sched and sched.num_waiting == 1
    assert sched.schedule().prefill == ()
    sched.finish(0)
    assert sched.schedule() == StepPlan(prefill=(3,), decode=(1,))
    assert sched.schedule() == StepPlan(prefill=(), decode=(1, 3))
    assert sorted(sched.abort_all()) == [1, 3]
    assert sched.schedule().empty


def test_refusals_say_the_numbers_and_change_nothing() -> None:
    sched = Scheduler(SchedulerConfig(kv_capacity_tokens=64, kv_page_size=16, max_waiting=2))
    message = (r"prompt \(60 tokens\) \+ max_new_tokens \(5\) = 65 tokens can never fit "
               r"the KV cache \(64 tokens\)")
    with pytest.raises(InvalidArgument, match=message):
        sched.submit(1, 60, 5)
    with pytest.raises(InvalidArgument, match="at least 1 token"):
        sched.submit(1, 0, 5)
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        sched.submit(1, 5, 0)
    sched.submit(1, 10, 10)
    sched.submit(2, 10, 10)
    with pytest.raises(ResourceExhausted, match=r"^waiting queue full \(2 requests\)$"):
        sched.submit(3, 10, 10)
    with pytest.raises(ValueError, match="already scheduled"):
        sched.submit(2, 10, 10)
    assert sched.num_waiting == 2 and 3 not in sched


@pytest.mark.parametrize(("field", "kwargs"), [
    ("kv_capacity_tokens", {"kv_capacity_tokens": 0}),
    ("kv_page_size", {"kv_page_size": 0}),
    ("max_waiting", {"max_waiting": -1}),
    ("max_running", {"max_running": 1.5}),
    ("prefill_token_budget", {"prefill_token_budget": 0}),
    ("kv_capacity_tokens", {"kv_capacity_tokens": 8, "kv_page_size": 16}),
    ("kv_reservation", {"kv_reservation": "lazy"}),
])
def test_config_validation_names_the_field(field: str, kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"kv_capacity_tokens": 1024, **kwargs}
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**args)  # type: ignore[arg-type]
