"""Async clients to every shard of the group: each call goes to all ranks at once, with a deadline.

A call succeeds only when every rank answers; the first failure cancels the others and raises
`Unavailable` naming the shard (address and rank) and what went wrong. `check_group` decides
whether the ranks' `Info` answers form one consistent group.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router_svc.sampling import ShardCandidates
from services.errors import Unavailable
from services.pb.cpumesh.v1 import shard_pb2, shard_pb2_grpc
from services.transport import open_channel

T = TypeVar("T")
RECONNECT_OPTIONS = [  # a restarted shard is reconnected to within a second, not minutes
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class ShardInfo:
    address: str
    model_fingerprint: str
    model_name: str
    tp_rank: int
    tp_size: int
    vocab_range: tuple[int, int]
    vocab_size: int
    dtype: str
    kv_capacity_tokens: int
    kv_free_tokens: int
    kv_page_size: int
    max_context: int
    max_top_k: int
    next_step_id: int
    prefix_cache: bool = False  # new sequences reuse cached prefix pages


@dataclass(frozen=True)
class GroupInfo:
    """The group as the router schedules it: the smallest capacity and context of any rank."""

    model_fingerprint: str
    model_name: str
    tp_size: int
    vocab_size: int
    dtype: str
    kv_capacity_tokens: int
    kv_page_size: int
    max_context: int
    max_top_k: int
    next_step_id: int  # the largest any rank expects
    prefix_cache: bool = False  # every rank reuses cached prefix pages


def check_group(infos: Sequence[ShardInfo]) -> GroupInfo:
    """The group of `infos` (in address order), or Unavailable saying how it is inconsistent."""
    first = infos[0]
    for i, info in enumerate(infos):
        where = f"shard {info.address}"
        if info.tp_rank != i or info.tp_size != len(infos):
            raise Unavailable(f"{where} is rank {info.tp_rank} of {info.tp_size}; the router "
                              f"expects rank {i} of {len(infos)}")
        for name in ("model_fingerprint", "vocab_size", "dtype", "kv_page_size"):
            if getattr(info, name) != getattr(first, name):
                raise Unavailable(f"{where} has {name} {getattr(info, name)!r}, shard "
                                  f"{first.address} has {getattr(first, name)!r}")
    stops = [0, *(info.vocab_range[1] for info in infos)]
    if [info.vocab_range[0] for info in infos] != stops[:-1] or stops[-1] != first.vocab_size:
        raise Unavailable(f"the shards' vocab ranges {[info.vocab_range for info in infos]} do "
                          f"not tile the vocabulary of {first.vocab_size} tokens")
    return GroupInfo(
        model_fingerprint=first.model_fingerprint, model_name=first.model_name,
        tp_size=first.tp_size, vocab_size=first.vocab_size, dtype=first.dtype,
        kv_capacity_tokens=min(i.kv_capacity_tokens for i in infos),
        kv_page_size=first.kv_page_size, max_context=min(i.max_context for i in infos),
        max_top_k=min(i.max_top_k for i in infos),
        next_step_id=max(i.next_step_id for i in infos),
        prefix_cache=all(i.prefix_cache for i in infos))


@dataclass(frozen=True)
class SeqWork:
    """One sequence's part of a step: its whole prompt (prefill) or its newest token."""

    seq_id: int
    token_ids: tuple[int, ...]
    prefill: bool
    top_k: int
    temperature: float


@dataclass(frozen=True)
class StepResult:
    candidates: dict[int, list[ShardCandidates]]  # seq_id → one answer per rank, in rank order
    wait_s: float  # wall time spent awaiting the shards
    compute_s: float  # the slowest rank's compute time
    allreduce_s: float  # the slowest rank's time inside allreduce
    prefill_tokens: int  # prompt tokens in the step
    cached_tokens: int = 0  # of those, the ones found in the shards' prefix cache


class ShardGroup:
    def __init__(self, addresses: Sequence[str],
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = (), token: str | None = None) -> None:
        self.addresses = tuple(addresses)
        opts = [*options, *RECONNECT_OPTIONS]
        self._channels = [open_channel(a, credentials, opts, token) for a in self.addresses]
        self._stubs = [shard_pb2_grpc.ShardServiceStub(c) for c in self._channels]
        self._health = [health_pb2_grpc.HealthStub(c) for c in self._channels]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def _all(self, what: str, call: Callable[[int], Awaitable[T]]) -> list[T]:
        """call(rank) on every rank concurrently; the first failure cancels the rest."""
        tasks = [asyncio.ensure_future(call(rank)) for rank in range(len(self.addresses))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            errors = [(rank, task.exception()) for rank, task in enumerate(tasks)
                      if task.done() and not task.cancelled()]
            for rank, error in errors:
                if error is not None:
                    raise _unavailable(self.addresses[rank], rank, what, error)
            return [task.result() for task in tasks]
        finally:
            for task in tasks:
                task.cancel()

    async def step_all(self, step_id: int, work: Sequence[SeqWork],
                       timeout: float) -> StepResult:
        request = shard_pb2.StepRequest(
            step_id=step_id,
            prefill=[shard_pb2.PrefillSeq(seq_id=w.seq_id, token_ids=w.token_ids, top_k=w.top_k,
                                          temperature=w.temperature) for w in work if w.prefill],
            extend=[shard_pb2.ExtendSeq(seq_id=w.seq_id, token_id=w.token_ids[0], top_k=w.top_k,
                                        temperature=w.temperature)
                    for w in work if not w.prefill])
        order = [r.seq_id for r in request.prefill] + [r.seq_id for r in request.extend]
        t0 = time.perf_counter()
        responses = await self._all(f"step {step_id}",
                                    lambda rank: self._stubs[rank].Step(request, timeout=timeout))
        wait_s = time.perf_counter() - t0
        candidates: dict[int, list[ShardCandidates]] = {seq_id: [] for seq_id in order}
        for rank, response in enumerate(responses):
            if response.step_id != step_id or [r.seq_id for r in response.results] != order:
                raise Unavailable(f"shard {self.addresses[rank]} (rank {rank}) answered step "
                                  f"{step_id} with step {response.step_id} or other sequences")
            for r in response.results:
                candidates[r.seq_id].append(ShardCandidates(
                    tuple(r.logits), tuple(r.token_ids), r.logsumexp, r.logsumexp_t))
        return StepResult(candidates, wait_s, max(r.compute_s for r in responses),
                          max(r.allreduce_s for r in responses),
                          sum(len(p.token_ids) for p in request.prefill),
                          sum(r.cached_tokens for r in responses[0].results))

    async def info_all(self, timeout: float) -> list[ShardInfo]:
        responses = await self._all("Info", lambda rank: self._stubs[rank].Info(
            shard_pb2.ShardInfoRequest(), timeout=timeout))
        return [ShardInfo(
            address=a, model_fingerprint=r.model_fingerprint, model_name=r.model_name,
            tp_rank=r.tp_rank, tp_size=r.tp_size,
            vocab_range=(r.plan.vocab_range.start, r.plan.vocab_range.stop),
            vocab_size=r.vocab_size, dtype=r.dtype, kv_capacity_tokens=r.kv_capacity_tokens,
            kv_free_tokens=r.kv_free_tokens, kv_page_size=r.kv_page_size,
            max_context=r.max_context, max_top_k=r.max_top_k, next_step_id=r.next_step_id,
            prefix_cache=r.prefix_cache)
            for a, r in zip(self.addresses, responses, strict=True)]

    async def health_all(self, timeout: float) -> list[bool]:
        """Whether each rank reports SERVING; an unreachable one counts as not serving."""
        async def check(rank: int) -> bool:
            try:
                response = await self._health[rank].Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            except grpc.aio.AioRpcError:
                return False
            return bool(response.status == health_pb2.HealthCheckResponse.SERVING)
        return list(await asyncio.gather(*(check(r) for r in range(len(self.addresses)))))

    async def release_all(self, seq_ids: Sequence[int], timeout: float) -> None:
        request = shard_pb2.ReleaseRequest(seq_ids=seq_ids)
        await self._all("Release", lambda rank: self._stubs[rank].Release(request,
                                                                          timeout=timeout))

    async def reset_all(self, next_step_id: int, timeout: float) -> None:
        request = shard_pb2.ResetRequest(next_step_id=next_step_id)
        responses = await self._all("Reset", lambda rank: self._stubs[rank].Reset(
            request, timeout=timeout))
        for rank, r in enumerate(responses):
            if r.next_step_id != next_step_id:
                raise Unavailable(f"shard {self.addresses[rank]} (rank {rank}) did not take "
                                  f"next step id {next_step_id}")


def _unavailable(address: str, rank: int, what: str, error: BaseException | None) -> Unavailable:
    if isinstance(error, grpc.aio.AioRpcError):
        detail = f"{error.code().name}: {error.details()}"
    else:
        detail = f"{type(error).__name__}: {error}"
    return Unavailable(f"shard {address} (rank {rank}) failed {what}: {detail}")
