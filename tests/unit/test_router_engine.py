"""The router engine against in-memory shards and tokenizer: batching, stops, cancel, failures."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from router_svc.config import RouterConfig
from router_svc.engine import Engine
from router_svc.metrics import RouterMetrics
from router_svc.request import GenerateRequest
from router_svc.sequence import Chunk
from router_svc.stops import FinishReason
from services.errors import InvalidArgument, ResourceExhausted, Unavailable
from tests.unit.router_fakes import (
    EOS,
    TEXTS,
    FakeShards,
    FakeTokenizer,
    decode,
    fake_logits,
    run_engine,
)

pytestmark = pytest.mark.asyncio
CONFIG = RouterConfig(tokenizer="fake:1", shards=("fake-shard-0:1", "fake-shard-1:1"),
                      health_interval_s=0.05, recover_poll_s=0.01, max_waiting=8, max_running=8,
                      prefill_token_budget=16)


def greedy_reference(prompt: str, n: int) -> list[int]:
    history = [TEXTS.index(c) for c in prompt]
    out: list[int] = []
    while len(out) < n:
        logits = fake_logits(history)
        token = min(range(len(logits)), key=lambda i: (-logits[i], i))
        out.append(token)
        history.append(token)
        if token == EOS:
            break
    return out


@contextlib.asynccontextmanager
async def engine_running(config: RouterConfig = CONFIG, **shard_args: object
                         ) -> AsyncIterator[tuple[Engine, FakeShards, FakeTokenizer]]:
    shards, tokenizer = FakeShards(**shard_args), FakeTokenizer()  # type: ignore[arg-type]
    serving: list[bool] = []

    async def on_serving(value: bool) -> None:
        serving.append(value)

    engine = Engine(config, shards, tokenizer, on_serving)  # type: ignore[arg-type]
    async with run_engine(engine):
        yield engine, shards, tokenizer
    assert serving[0] is True


async def collect(engine: Engine, request: GenerateRequest) -> list[Chunk]:
    stream = await engine.submit(request)
    try:
        return [chunk async for chunk in stream]
    finally:
        stream.close()


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def ids_of(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def test_greedy_alone_and_in_a_staggered_batch_equal_the_reference() -> None:
    prompts = ["abc", "hello", "x", "the quick", "zz", "a,b.c", "qqq", "mn op"]
    lengths = [3, 9, 14, 5, 20, 1, 7, 11]
    async with engine_running() as (engine, shards, _):
        solo = [await collect(engine, GenerateRequest(prompt=p, max_new_tokens=n, temperature=0))
                for p, n in zip(prompts, lengths, strict=True)]

        async def delayed(i: int) -> list[Chunk]:
            await asyncio.sleep(0.004 * i)  # join at different steps
            return await collect(engine, GenerateRequest(prompt=prompts[i],
                                                         max_new_tokens=lengths[i],
                                                         temperature=0))

        first_batch_step = len(shards.steps)
        batch = await asyncio.gather(*(delayed(i) for i in range(len(prompts))))
        assert not shards.seqs, "every sequence released"
    steps = shards.steps[first_batch_step:]
    joined = {step_id for step_id, work in steps if any(w.prefill for w in work)}
    mixed = [work for _, work in steps if len({w.prefill for w in work}) == 2]
    assert len(joined) >= 3 and mixed, "requests join at different steps, beside decodes"
    for p, n, s, b in zip(prompts, lengths, solo, batch, strict=True):
        assert ids_of(s) == ids_of(b) == greedy_reference(p, n)
        assert text_of(s) == text_of(b) == decode(ids_of(s)[:-1] if ids_of(s)[-1] == EOS
                                                  else ids_of(s))
        assert s[-1].finish is not None and s[-1].usage is not None
        assert s[-1].usage.generated_tokens == len(ids_of(s))
        assert all(c.finish is None for c in s[:-1])
    batch_sizes = [len(work) for _, work in shards.steps]
    assert max(batch_sizes) >= 4, batch_sizes


async def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy() -> None:
    async with engine_running() as (engine, _, _):
        seeded = GenerateRequest(prompt="hello", max_new_tokens=12, temperature=0.9, top_p=0.95,
                                 seed=1234, ignore_eos=True)
        a, b = await collect(engine, seeded), await collect(engine, seeded)
        c = await collect(engine, replace(seeded, seed=99))
        assert ids_of(a) == ids_of(b) and text_of(a) == text_of(b)
        assert ids_of(a) != ids_of(c)
        top1 = await collect(engine, GenerateRequest(prompt="abc", max_new_tokens=6, top_k=1,
                                                     temperature=1.5))
        assert ids_of(top1) == greedy_reference("abc", 6)


async def test_logprobs_are_exact_and_ordered() -> None:
    async with engine_running() as (engine, _, _):
        chunks = await collect(engine, GenerateRequest(
            prompt="ab", max_new_tokens=4, temperature=0, logprobs=True, top_logprobs=3))
    history = [TEXTS.index(c) for c in "ab"]
    positions = [p for c in chunks for p in c.logprobs]
    assert len(positions) == len(ids_of(chunks))
    for token, position in zip(ids_of(chunks), positions, strict=True):
        logits = fake_logits(history)
        lse = max(logits) + math.log(sum(math.exp(v - max(logits)) for v in logits))
        assert position.token.token_id == token and position.token.text == TEXTS[token]
        assert position.token.logprob == pytest.approx(logits[token] - lse, abs=1e-9)
        assert [t.token_id for t in position.top] == sorted(
            range(len(logits)), key=lambda i: (-logits[i], i))[:3]
        history.append(token)


async def test_stop_strings_split_across_tokens_are_never_streamed() -> None:
    async with engine_running() as (engine, _, _):
        free = await collect(engine, GenerateRequest(prompt="the", max_new_tokens=40,
                                                     temperature=0, ignore_eos=True))
        text = text_of(free)
        # a stop string that starts inside one token and ends inside a later one
        k = len(TEXTS[ids_of(free)[0]]) + len(TEXTS[ids_of(free)[1]]) - 1
        stop = text[k - 1:k + 2]
        assert len(stop) == 3
        chunks = await collect(engine, GenerateRequest(prompt="the", max_new_tokens=40,
                                                       temperature=0, ignore_eos=True,
                                                       stop=("nothing-like-this", stop)))
        cut = text.index(stop)
        assert text_of(chunks) == text[:cut]
        assert chunks[-1].finish is not None and chunks[-1].finish.reason is FinishReason.STOP
        assert chunks[-1].stop_string == stop
        assert all(stop not in c.text for c in chunks)


async def test_cancel_releases_on_the_shards_within_one_step_and_spares_others() -> None:
    async with engine_running() as (engine, shards, _):
        other = asyncio.ensure_future(collect(engine, GenerateRequest(
            prompt="abc", max_new_tokens=30, temperature=0, ignore_eos=True)))
        stream = await engine.submit(GenerateRequest(prompt="hello", max_new_tokens=200,
                                                     temperature=0, ignore_eos=True))
        async for chunk in stream:
            if chunk.token_ids:
                break
        seq_id = stream.seq.seq_id
        assert seq_id in shards.seqs
        steps_before = len(shards.steps)
        stream.close()
        async with asyncio.timeout(2):
            while seq_id in shards.seqs:
                await asyncio.sleep(0.0005)
        assert len(shards.steps) - steps_before <= 1
        assert all(seq_id not in [w.seq_id for w in work]
                   for _, work in shards.steps[steps_before + 1:])
        assert ids_of(await other) == greedy_reference("abc", 30)


async def test_step_failure_fails_requests_then_recovers() -> None:
    async with engine_running() as (engine, shards, _):
        streams = [await engine.submit(GenerateRequest(prompt="ab", max_new_tokens=100,
                                                       ignore_eos=True)) for _ in range(3)]
        shards.fail_at_step = shards.next_step_id + 3
        for stream in streams:
            chunks = [c async for c in stream]
            assert chunks[-1].finish is not None
            assert chunks[-1].finish.reason is FinishReason.ERROR
            assert isinstance(chunks[-1].error, Unavailable)
            assert "fake-shard-1" in str(chunks[-1].error)
        assert not engine.serving
        with pytest.raises(Unavailable, match="not serving"):
            await engine.submit(GenerateRequest(prompt="ab", max_new_tokens=2))
        resets = shards.resets
        shards.fail_at_step, shards.healthy = None, True
        async with asyncio.timeout(2):
            while not engine.serving:
                await asyncio.sleep(0.001)
        assert shards.resets == resets + 1 and not shards.seqs
        ok = await collect(engine, GenerateRequest(prompt="abc", max_new_tokens=5, temperature=0))
        assert ids_of(ok) == greedy_reference("abc", 5)


async def test_a_step_failure_is_counted_in_the_metrics_as_it_happens() -> None:
    async with engine_running() as (engine, shards, _):
        metrics = RouterMetrics(engine)
        stream = await engine.submit(GenerateRequest(prompt="ab", max_new_tokens=100,
                                                     ignore_eos=True))
        shards.fail_at_step = shards.next_step_id + 2
        assert [c async for c in stream][-1].error is not None
        assert engine.stats.step_failures == 1
        assert metrics.registry.get_sample_value("cpumesh_step_failures_total") == 1.0


async def test_idle_health_check_notices_a_lost_shard() -> None:
    async with engine_running() as (engine, shards, _):
        shards.healthy = False
        async with asyncio.timeout(2):
            while engine.serving:
                await asyncio.sleep(0.005)
        shards.healthy = True
        async with asyncio.timeout(2):
            while not engine.serving:
                await asyncio.sleep(0.005)


async def test_tokenizer_failure_fails_only_its_requests() -> None:
    async with engine_running() as (engine, _, tokenizer):
        stream = await engine.submit(GenerateRequest(prompt="ab", max_new_tokens=50))
        tokenizer.fail = Unavailable("tokenizer fake-tokenizer:1 failed: gone")
        chunks = [c async for c in stream]
        assert isinstance(chunks[-1].error, Unavailable)
        tokenizer.fail = None
        assert engine.serving
        assert ids_of(await collect(engine, GenerateRequest(
            prompt="abc", max_new_tokens=3, temperature=0))) == greedy_reference("abc", 3)


async def test_full_queue_and_impossible_requests_are_refused_at_once() -> None:
    config = replace(CONFIG, max_waiting=2, max_running=1)
    async with engine_running(config, kv_capacity=256) as (engine, shards, _):
        with pytest.raises(InvalidArgument, match="context length"):
            await engine.submit(GenerateRequest(prompt="abc", max_new_tokens=510))
        with pytest.raises(InvalidArgument, match="KV cache"):
            await engine.submit(GenerateRequest(prompt="abc", max_new_tokens=300))
        with pytest.raises(InvalidArgument, match=r"sampling\.top_p"):
            await engine.submit(GenerateRequest(prompt="abc", top_p=0.0))
        running = await engine.submit(GenerateRequest(prompt="ab", max_new_tokens=100))
        await asyncio.sleep(0.02)  # admitted: the queue is empty again
        waiting = [await engine.submit(GenerateRequest(prompt="ab", max_new_tokens=100))
                   for _ in range(2)]
        with pytest.raises(ResourceExhausted, match="waiting queue full"):
            await engine.submit(GenerateRequest(prompt="ab", max_new_tokens=100))
        for s in (running, *waiting):
            s.close()
        async with asyncio.timeout(2):
            while shards.seqs:
                await asyncio.sleep(0.001)


async def test_default_max_new_tokens_runs_to_the_context() -> None:
    async with engine_running(max_context=40) as (engine, _, _):
        chunks = await collect(engine, GenerateRequest(prompt="hello", ignore_eos=True))
    assert len(ids_of(chunks)) == 35
    assert chunks[-1].finish is not None and chunks[-1].finish.detail == "context length 40"


async def test_cancel_while_waiting_or_during_its_prefill_step() -> None:
    async with engine_running(step_delay_s=0.03) as (engine, shards, _):
        queued = await engine.submit(GenerateRequest(prompt="ab", max_new_tokens=50))
        queued.close()  # before any step: never reaches the shards
        in_flight = await engine.submit(GenerateRequest(prompt="abc", max_new_tokens=50))
        async with asyncio.timeout(2):
            while not in_flight.seq.prefilled:
                await asyncio.sleep(0.001)
        in_flight.close()  # its prefill step is running: released right after it
        async with asyncio.timeout(2):
            while not shards.releases:
                await asyncio.sleep(0.001)
        assert shards.releases == [[in_flight.seq.seq_id]] and not shards.seqs
        prefilled = {w.seq_id for _, work in shards.steps for w in work}
        assert queued.seq.seq_id not in prefilled and in_flight.seq.seq_id in prefilled
        assert engine.stats.finished["cancelled"] == 2
