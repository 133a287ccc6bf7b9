"""ShardService over gRPC: a thin adapter (parse → engine call in a worker thread → convert)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from services.errors import Unavailable
from services.limits import MAX_TOP_K
from services.pb.cpumesh.v1 import common_pb2, shard_pb2
from shard_svc.engine import SeqWork, ShardEngine, StepOutput

T = TypeVar("T")


class ShardServicer:
    def __init__(self, fingerprint: str, model_name: str, dtype: str,
                 on_step_failure: Callable[[BaseException], Awaitable[None]] | None = None,
                 formation: Callable[[], int] = lambda: 0) -> None:
        self._engine: ShardEngine | None = None  # set once loaded, meshed and warm
        self.fingerprint = fingerprint
        self.model_name = model_name
        self.dtype = dtype
        self.on_step_failure = on_step_failure
        self.formation = formation  # the mesh formation's id; Unavailable while it is broken
        # One worker: steps run one at a time, off the event loop, so health checks,
        # cancellations and keepalives never wait behind a forward pass.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="shard-step")

    @property
    def engine(self) -> ShardEngine:
        if self._engine is None:
            raise Unavailable("the shard is starting: weights, mesh or warm-up not ready")
        return self._engine

    @engine.setter
    def engine(self, engine: ShardEngine) -> None:
        self._engine = engine

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def Info(self, request: shard_pb2.ShardInfoRequest,
                   context: grpc.aio.ServicerContext) -> shard_pb2.ShardInfoResponse:
        e, plan = self.engine, self.engine.model.plan
        return shard_pb2.ShardInfoResponse(
            model_fingerprint=self.fingerprint, tp_rank=plan.tp_rank, tp_size=plan.tp_size,
            plan=shard_pb2.ShardPlan(
                q_head_range=_range(plan.q_head_range), kv_head_range=_range(plan.kv_head_range),
                intermediate_range=_range(plan.intermediate_range),
                vocab_range=_range(plan.vocab_range)),
            dtype=self.dtype, kv_capacity_tokens=e.cache.capacity_tokens,
            kv_free_tokens=e.cache.free_tokens, kv_page_size=e.cache.page_size,
            max_context=e.max_context, vocab_size=e.model.config.vocab_size,
            max_top_k=MAX_TOP_K, next_step_id=e.next_step_id, model_name=self.model_name,
            prefix_cache=e.cache.prefix is not None)

    async def Step(self, request: shard_pb2.StepRequest,
                   context: grpc.aio.ServicerContext) -> shard_pb2.StepResponse:
        engine = self.engine
        work = [SeqWork(p.seq_id, tuple(p.token_ids), True, p.top_k, p.temperature)
                for p in request.prefill]
        work += [SeqWork(x.seq_id, (x.token_id,), False, x.top_k, x.temperature)
                 for x in request.extend]
        formation = self.formation()
        try:
            out: StepOutput = await self._run(self._step, engine, formation, request.step_id,
                                              work)
        except Exception as e:
            if self.on_step_failure is not None:
                await self.on_step_failure(e)
            raise
        return shard_pb2.StepResponse(
            step_id=out.step_id, compute_s=out.compute_s, allreduce_s=out.allreduce_s,
            results=[shard_pb2.SeqTopK(seq_id=r.seq_id, logits=r.logits, token_ids=r.token_ids,
                                       logsumexp=r.logsumexp, logsumexp_t=r.logsumexp_t,
                                       cached_tokens=r.cached_tokens)
                     for r in out.results])

    def _step(self, engine: ShardEngine, formation: int, step_id: int, work: list[SeqWork]
              ) -> StepOutput:
        """On the step thread: the step, unless the mesh re-formed while it waited (its peers
        will not run it: the caller gave up on it and resets the group)."""
        if self.formation() != formation:
            raise Unavailable(f"step {step_id} arrived before the mesh was re-formed")
        return engine.step(step_id, work)

    async def Release(self, request: shard_pb2.ReleaseRequest,
                      context: grpc.aio.ServicerContext) -> shard_pb2.ReleaseResponse:
        freed = await self._run(self.engine.release, list(request.seq_ids))
        return shard_pb2.ReleaseResponse(freed_tokens=freed,
                                         kv_free_tokens=self.engine.cache.free_tokens)

    async def Reset(self, request: shard_pb2.ResetRequest,
                    context: grpc.aio.ServicerContext) -> shard_pb2.ResetResponse:
        next_id = request.next_step_id if request.HasField("next_step_id") else None
        await self._run(self.engine.reset, next_id)
        return shard_pb2.ResetResponse(kv_free_tokens=self.engine.cache.free_tokens,
                                       next_step_id=self.engine.next_step_id)


def _range(r: tuple[int, int]) -> common_pb2.Range:
    return common_pb2.Range(start=r[0], stop=r[1])
