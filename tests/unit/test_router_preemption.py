"""The router engine with a KV cache too small for its batch: sequences are preempted and
recomputed, their streams go on unbroken, and the fake shards (which fail a step that overflows
their cache) never run out of pages."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from router_svc.metrics import RouterMetrics
from router_svc.request import GenerateRequest
from services.errors import InvalidArgument
from tests.unit.router_fakes import TEXTS, decode, fake_logits
from tests.unit.test_router_engine import CONFIG, collect, engine_running, ids_of, text_of

pytestmark = pytest.mark.asyncio
PROMPTS = ["abc", "hello", "the quick", "zz", "a,b.c", "mn op"]


def greedy_reference(prompt: str, n: int) -> list[int]:
    history, out = [TEXTS.index(c) for c in prompt], []
    for _ in range(n):
        logits = fake_logits(history)
        out.append(min(range(len(logits)), key=lambda i: (-logits[i], i)))
        history.append(out[-1])
    return out


async def test_greedy_and_seeded_streams_survive_preemption_unchanged() -> None:
    async with engine_running(kv_capacity=64, page=16) as (engine, shards, _):  # 4 pages
        metrics = RouterMetrics(engine)
        requests = [GenerateRequest(prompt=p, max_new_tokens=24 + i, ignore_eos=True,
                                    temperature=0 if i % 2 else 0.8, seed=i)
                    for i, p in enumerate(PROMPTS)]
        solo = [await collect(engine, r) for r in requests]
        assert engine.stats.preemptions == 0
        crowded = await asyncio.gather(*(collect(engine, r) for r in requests))
        assert engine.stats.preemptions > 0
        assert not shards.seqs, "every sequence released"
        assert engine.scheduler is not None and engine.scheduler.kv_tokens_reserved == 0
    for i, (s, c) in enumerate(zip(solo, crowded, strict=True)):
        assert ids_of(s) == ids_of(c)  # greedy and seeded sampling alike
        if requests[i].temperature == 0:
            assert ids_of(c) == greedy_reference(PROMPTS[i], 24 + i)
        assert text_of(c) == decode(ids_of(c))
        assert c[-1].usage is not None and c[-1].usage.prompt_tokens == len(PROMPTS[i])
    recomputed = [w for _, work in shards.steps for w in work
                  if w.prefill and len(w.token_ids) > len(PROMPTS[-1])]
    assert recomputed, "a preempted sequence was prefilled again with its generated tokens"
    body = metrics.exposition().decode()
    assert f"cpumesh_preemptions_total {float(engine.stats.preemptions)}" in body
    assert "cpumesh_kv_cache_pages_used 0.0" in body and "cpumesh_kv_cache_pages_free 4.0" in body


async def test_cancelling_a_preempted_request_frees_everything() -> None:
    async with engine_running(kv_capacity=64, page=16) as (engine, shards, _):
        streams = [await engine.submit(GenerateRequest(prompt=p, max_new_tokens=40,
                                                       ignore_eos=True)) for p in PROMPTS[:4]]
        async with asyncio.timeout(5):
            while not engine.stats.preemptions:
                await asyncio.sleep(0.001)
        for s in streams[1:]:
            s.close()
        chunks = [c async for c in streams[0]]
        streams[0].close()
        assert len(ids_of(chunks)) == 40
        async with asyncio.timeout(2):
            while shards.seqs:
                await asyncio.sleep(0.001)
        assert engine.scheduler is not None
        assert (engine.scheduler.num_running, engine.scheduler.num_waiting,
                engine.scheduler.kv_tokens_reserved) == (0, 0, 0)


async def test_the_old_full_reservation_never_preempts() -> None:
    config = replace(CONFIG, kv_reservation="full")
    async with engine_running(config, kv_capacity=64, page=16) as (engine, shards, _):
        out = await asyncio.gather(*(collect(engine, GenerateRequest(
            prompt=p, max_new_tokens=20, ignore_eos=True, temperature=0)) for p in PROMPTS))
        assert engine.stats.preemptions == 0 and not shards.seqs
    assert [ids_of(c) for c in out] == [greedy_reference(p, 20) for p in PROMPTS]


async def test_default_cap_and_the_whole_cache_as_the_limit() -> None:
    config = replace(CONFIG, default_max_new_tokens=6)
    async with engine_running(config, kv_capacity=64, page=16, max_context=512) as (engine, _, _):
        chunks = await collect(engine, GenerateRequest(prompt="hello", ignore_eos=True))
        assert len(ids_of(chunks)) == 6
        assert chunks[-1].finish is not None
        assert chunks[-1].finish.detail == ("default max_new_tokens 6 reached "
                                            "(--default-max-new-tokens)")
        with pytest.raises(InvalidArgument, match="can never fit the KV cache"):
            await engine.submit(GenerateRequest(prompt="hello", max_new_tokens=60))
