"""The router's engine: one step at a time across every shard, overlapped with detokenization.

    stream = await engine.submit(request)   # validated, tokenized and queued, or an error
    async for chunk in stream: ...           # text deltas and token ids; the last has finish
    stream.close()                           # in `finally`: cancels it if still running

Each step: release the sequences that ended, let the scheduler admit waiting requests (their
prefill runs in the same step as the others' decode), send the step to all shards, and, while
the shards compute, detokenize the previous step's tokens (one DetokenizeBatch for the batch),
check stop strings and stream the chunks. Then merge each sequence's candidates and sample.

A failed step fails every live request with UNAVAILABLE, reports not serving, and `_recover`
polls the shards (with deadlines) until they are whole and consistent, resets them with a fresh
step id, and serves again. Adapters (gRPC here; HTTP and metrics later) use `submit`, `model`,
`serving`, `stats` and `admission` (the bounds on requests in flight) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from router_svc.admission import Admission
from router_svc.config import RouterConfig
from router_svc.group import group_scheduler, until_whole
from router_svc.intake import queue_request
from router_svc.request import GenerateRequest, validate
from router_svc.sampling import merge
from router_svc.scheduler import Scheduler, StepPlan
from router_svc.sequence import Chunk, SeqStatus, Sequence
from router_svc.served_model import ServedModel, probe
from router_svc.shards import ShardGroup, StepResult
from router_svc.stats import EngineStats
from router_svc.step_text import stream_text
from router_svc.stops import Finish, FinishReason
from router_svc.stream import Stream
from router_svc.tokenizer_client import TokenizerClient
from services.errors import CpumeshError, Unavailable

log = logging.getLogger("cpumesh.router")
T = TypeVar("T")


class Engine:
    def __init__(self, config: RouterConfig, shards: ShardGroup, tokenizer: TokenizerClient,
                 on_serving: Callable[[bool], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.shards, self.tokenizer = config, shards, tokenizer
        self.on_serving, self.clock = on_serving, clock
        self.model: ServedModel | None = None
        self.serving = False
        self.not_serving_reason = "connecting to the shards and the tokenizer"
        self.stats = EngineStats()
        # Shared by the adapters: a ticket per request, taken before it is parsed.
        self.admission = Admission(config.max_inflight_requests, config.max_inflight_bytes)
        self.step_id = 0
        self._scheduler: Scheduler | None = None
        self._seqs: dict[int, Sequence] = {}
        self._ids = itertools.count(1)
        self._to_release: set[int] = set()
        self._detok: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def scheduler(self) -> Scheduler | None:
        """The current scheduler (None until the group is first whole), for metrics to read."""
        return self._scheduler

    # -- requests -------------------------------------------------------------------------------

    async def submit(self, request: GenerateRequest) -> Stream:
        """Validate, tokenize and queue a request; raise before any chunk when it cannot run.
        A waiting slot is taken before the prompt goes to the tokenizer (ResourceExhausted when
        the queue, counting requests being tokenized, is full)."""
        arrival = self.clock()
        model, scheduler = self.model, self._scheduler
        if model is None:
            raise Unavailable(f"the router is not serving: {self.not_serving_reason}")
        limits = model.limits(self.config)
        validate(request, limits)  # against the last group seen, even while it is not whole
        if scheduler is None or not self.serving:
            raise Unavailable(f"the router is not serving: {self.not_serving_reason}")

        def check_serving() -> None:
            if scheduler is not self._scheduler or not self.serving:
                raise Unavailable(f"the router is not serving: {self.not_serving_reason}")

        seq = await queue_request(request, model, limits, scheduler, self.tokenizer,
                                  self.config, next(self._ids), arrival, check_serving)
        self._seqs[seq.seq_id] = seq
        self._wake.set()
        return Stream(self, seq)

    def cancel(self, seq: Sequence) -> None:
        """End `seq` as cancelled, unless it has ended (its stream's `close` always calls this)."""
        self._end(seq, Chunk(), Finish(FinishReason.CANCELLED, "cancelled"))

    def _fail(self, seq: Sequence, error: CpumeshError) -> None:
        """End `seq` with an error: its last chunk carries finish ERROR and the error to raise."""
        self._end(seq, Chunk(error=error), Finish(FinishReason.ERROR, str(error)))

    def _end(self, seq: Sequence, last: Chunk | None = None, finish: Finish | None = None) -> None:
        """The one place a sequence ends, however it ends: a stop, EOS or length decided at a
        token, a stop string, a cancel, an error, the failure of the whole group.

        The first call takes it out of the steps: its reservation is freed, and its KV released
        before the next step (so the shards never hold more than the scheduler has reserved).
        Without `last` (a stop decided at a token), it is FINISHING until its last text is
        detokenized; with it, `last` is pushed as the last chunk (with `finish`, which replaces
        one decided earlier), the sequence is forgotten and its end counted and logged."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is not SeqStatus.FINISHING:
            if self._scheduler is not None:
                self._scheduler.finish(seq.seq_id)
            if seq.status is SeqStatus.RUNNING:
                self._to_release.add(seq.seq_id)
            seq.status = SeqStatus.FINISHING
            self._wake.set()
        if last is None:
            return
        final = seq.last_chunk(last, self.clock(), finish)
        seq.push(final)
        seq.status, seq.left_step = SeqStatus.FINISHED, self.step_id
        self._seqs.pop(seq.seq_id, None)
        assert seq.finish is not None and final.usage is not None
        u = final.usage
        self.stats.ended(seq, u)
        steps = f"steps {seq.joined_step}-{seq.left_step}" if seq.prefilled else "never ran"
        log.info("request %s (seq %d): %s (%s); prompt %d, generated %d tokens; %s; "
                 "ttft %.3f s, total %.3f s", seq.request_id, seq.seq_id, seq.finish.reason.value,
                 seq.finish.detail, u.prompt_tokens, u.generated_tokens, steps,
                 u.time_to_first_token_s, u.total_s)

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled; every wait inside has a deadline."""
        try:
            await self._recover()
            while True:
                try:
                    t0, waited0 = time.perf_counter(), self.stats.waited_s
                    await self._release()
                    assert self._scheduler is not None
                    plan = self._scheduler.schedule()
                    await self._preempt(plan.preempted)
                    if plan.empty:
                        await self._idle()
                        continue
                    result = await self._step(plan)
                    if result is None:  # every sequence of the plan ended meanwhile
                        continue
                    wall = time.perf_counter() - t0
                    self.stats.record_step(len(plan.prefill), len(plan.prefill) + len(
                        plan.decode), result.prefill_tokens, result, wall,
                        wall - (self.stats.waited_s - waited0))
                except CpumeshError as e:
                    await self._on_failure(e)
                except Exception as e:  # a bug: fail what is in flight, start afresh
                    log.exception("step %d: unexpected error", self.step_id)
                    await self._on_failure(Unavailable(
                        f"step {self.step_id} failed: {type(e).__name__}: {e}"))
        finally:
            if self._detok is not None:
                self._detok.cancel()
            self._fail_all(Unavailable("the router is shutting down"))

    async def _idle(self) -> None:
        if self._detok is not None:
            await self._timed(self._take_detok(), "tokenizer")
            return
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), self.config.health_interval_s)
        except TimeoutError:  # nothing to do for a while: check the group is still whole
            await probe(self.shards, self.tokenizer, self.config.rpc_timeout_s)

    async def _release(self, ids: list[int] | None = None) -> None:
        """Release sequences on every shard and in the scheduler's replica of their pages, in
        this order (by default the ended ones; `_preempt` passes the plan's)."""
        if ids is None:
            ids, self._to_release = sorted(self._to_release), set()
        if ids:
            assert self._scheduler is not None
            self._scheduler.release(ids)  # those preempted it released already
            await self._timed(self.shards.release_all(ids, self.config.rpc_timeout_s), "release")

    async def _preempt(self, seq_ids: tuple[int, ...]) -> None:
        """The KV cache is full: these sequences leave the shards now and are prefilled again,
        with every token so far, when pages free up (their streams just wait meanwhile)."""
        if seq_ids:
            for seq_id in seq_ids:
                self._seqs[seq_id].status = SeqStatus.WAITING
            self.stats.preempted(len(seq_ids))
            await self._release(list(seq_ids))

    async def _step(self, plan: StepPlan) -> StepResult | None:
        # A sequence cancelled while the preempted ones were released is left out.
        seqs = [self._seqs[i] for i in (*plan.prefill, *plan.decode) if i in self._seqs]
        if not seqs:
            return None
        work = [s.work() for s in seqs]
        assert self._scheduler is not None
        self._scheduler.step_sent([(w.seq_id, w.token_ids) for w in work])
        sent = self.clock()
        for s in seqs[: len(plan.prefill)]:
            if not s.prefilled:  # not a recompute after a preemption
                s.joined_step = self.step_id
                self.stats.scheduled(s, sent)
            s.status = SeqStatus.RUNNING
        step = asyncio.ensure_future(self.shards.step_all(self.step_id, work,
                                                          self.config.step_timeout_s))
        try:
            if self._detok is not None:  # the previous step's text, while the shards compute
                await self._timed(self._take_detok(), "tokenizer")
            result = await self._timed(step, "shards")
        finally:
            step.cancel()
        self._scheduler.step_ran()
        self.step_id += 1
        now = self.clock()
        for s in seqs:
            if s.status is SeqStatus.RUNNING:  # not ended by a stop string or a cancel meanwhile
                s.accept(merge(result.candidates[s.seq_id]), now)
                self.stats.sampled(s, now)
                if s.finish is not None:  # a stop, EOS or length: its last text comes next
                    self._end(s)
        self._detok = asyncio.ensure_future(self._detokenize(
            [s for s in seqs if s.status is not SeqStatus.FINISHED]))
        return result

    async def _take_detok(self) -> None:
        task, self._detok = self._detok, None
        if task is not None:
            await task

    async def _detokenize(self, seqs: list[Sequence]) -> None:
        await stream_text(self.tokenizer, seqs, self.config.rpc_timeout_s, self._end, self._fail)

    # -- failures -------------------------------------------------------------------------------

    async def _on_failure(self, error: CpumeshError) -> None:
        """A step (or a health check) failed: fail every live request, then wait until whole."""
        log.error("the shard group failed at step %d: %s", self.step_id, error)
        self.stats.failed()
        await self._set_serving(False, str(error))
        with contextlib.suppress(Exception):  # streams that ended before it get their end
            await self._take_detok()
        self._fail_all(Unavailable(str(error)))
        await self._recover()

    def _fail_all(self, error: CpumeshError) -> None:
        for seq in list(self._seqs.values()):
            self._fail(seq, error)
        self._to_release.clear()  # the shards are reset before they step again

    async def _recover(self) -> None:
        """Poll until every shard is SERVING and consistent and the tokenizer answers; reset the
        shards to a fresh step id; serve again."""
        def waiting(reason: str) -> None:
            self.not_serving_reason = reason

        model, next_id = await until_whole(self.shards, self.tokenizer, self.config,
                                           self.step_id, waiting)
        self.step_id, self.model = next_id, model
        g = model.group
        self._scheduler = group_scheduler(self.config, g,
                                          lambda seq_id: self._seqs[seq_id].prefill_ids())
        log.info("shard group whole: %s, tp %d, KV %d tokens; serving from step %d",
                 g.model_name, g.tp_size, g.kv_capacity_tokens, next_id)
        await self._set_serving(True, "")

    async def _set_serving(self, serving: bool, reason: str) -> None:
        self.serving = serving
        self.not_serving_reason = reason
        if self.on_serving is not None:
            await self.on_serving(serving)

    # -- helpers --------------------------------------------------------------------------------

    async def _timed(self, awaitable: Awaitable[T], kind: str) -> T:
        t0 = time.perf_counter()
        try:
            return await awaitable
        finally:
            self.stats.add_wait(kind, time.perf_counter() - t0)
