"""Every way a request ends goes through one place: its KV is released on the shards exactly once
(never, if no step carried it, or when a failed group is reset instead), the scheduler forgets it,
and its end is counted once, whatever ends it: length, EOS, a stop token, a stop string, a cancel
(waiting, running, or while its last text is detokenized), a tokenizer or a step failure."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import pytest

from router_svc.engine import Engine
from router_svc.request import GenerateRequest
from router_svc.sequence import Chunk, Usage
from router_svc.sequence import Sequence as RouterSequence
from router_svc.stops import FinishReason
from router_svc.stream import Stream
from router_svc.tokenizer_client import DetokItem, DetokResult
from services.errors import Unavailable
from tests.unit.router_fakes import EOS, FakeShards, FakeTokenizer, run_engine
from tests.unit.test_router_engine import CONFIG, greedy_reference, ids_of, text_of

pytestmark = pytest.mark.asyncio
EOS_PROMPT = next(a + b for a, b in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=2)
                  if greedy_reference(a + b, 40)[-1] == EOS)  # greedy reaches EOS within 40


class GatedTokenizer(FakeTokenizer):
    """Holds detokenizations at `gate` while it is set (only a sequence's last, with
    `final_only`), until the test opens it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.final_only = False
        self.held = asyncio.Event()

    async def detokenize(self, items: Sequence[DetokItem], timeout: float,
                         skip_special_tokens: bool = True) -> list[DetokResult]:
        gate = self.gate
        if gate is not None and (not self.final_only or any(i.flush for i in items)):
            self.held.set()
            await gate.wait()
        return await super().detokenize(items, timeout, skip_special_tokens)


class Ends:
    """A stats listener recording each request's end."""

    def __init__(self) -> None:
        self.ended: list[tuple[int, FinishReason]] = []

    def on_ended(self, seq: RouterSequence, usage: Usage) -> None:
        assert seq.finish is not None
        self.ended.append((seq.seq_id, seq.finish.reason))

    def on_step(self, *args: object) -> None: ...
    def on_scheduled(self, *args: object) -> None: ...
    def on_sampled(self, *args: object) -> None: ...
    def on_failure(self) -> None: ...


@contextlib.asynccontextmanager
async def running(tokenizer: FakeTokenizer | None = None, **shard_args: object
                  ) -> AsyncIterator[tuple[Engine, FakeShards, Ends]]:
    shards, ends = FakeShards(**shard_args), Ends()  # type: ignore[arg-type]
    engine = Engine(CONFIG, shards, tokenizer or FakeTokenizer())  # type: ignore[arg-type]
    engine.stats.listeners.append(ends)  # type: ignore[arg-type]
    async with run_engine(engine):
        yield engine, shards, ends


async def drain(stream: Stream) -> list[Chunk]:
    async with asyncio.timeout(5):
        return [c async for c in stream]


async def assert_ended_once(engine: Engine, shards: FakeShards, ends: Ends, seq_id: int,
                            reason: FinishReason, releases: int) -> None:
    """`seq_id` ended once with `reason`; after more steps, it was released `releases` times."""
    async with asyncio.timeout(5):
        while seq_id in shards.seqs:
            await asyncio.sleep(0.001)
    # more steps and idle turns: a second release or end would show now
    after = await drain(await engine.submit(GenerateRequest(prompt="ab", max_new_tokens=3,
                                                            temperature=0, ignore_eos=True)))
    assert ids_of(after) == greedy_reference("ab", 3)
    assert sum(r.count(seq_id) for r in shards.releases) == releases
    assert [r for s, r in ends.ended if s == seq_id] == [reason]
    scheduler = engine.scheduler
    assert scheduler is not None and seq_id not in scheduler
    assert (scheduler.num_waiting, scheduler.num_running, scheduler.kv_tokens_reserved) == (0, 0, 0)
    assert not shards.seqs
    assert sum(engine.stats.finished.values()) == len(ends.ended)


def reason_of(chunks: list[Chunk]) -> FinishReason | None:
    return chunks[-1].finish.reason if chunks[-1].finish is not None else None


def first_new_token_at(ids: list[int], k: int) -> int:
    """The first index >= k whose token did not appear before it."""
    return next(i for i in range(k, len(ids)) if ids[i] not in ids[:i])


@pytest.mark.parametrize("how", ["length", "eos", "stop token", "stop string"])
async def test_a_sequence_that_finishes_is_released_once(how: str) -> None:
    ref = greedy_reference("abc", 12)
    if how == "length":
        request, reason, n = GenerateRequest(prompt="abc", max_new_tokens=5, temperature=0,
                                             ignore_eos=True), FinishReason.LENGTH, 5
    elif how == "eos":
        request, reason = GenerateRequest(prompt=EOS_PROMPT, max_new_tokens=40,
                                          temperature=0), FinishReason.STOP
        n = len(greedy_reference(EOS_PROMPT, 40))
    elif how == "stop token":
        k = first_new_token_at(ref, 2)
        request, reason, n = GenerateRequest(prompt="abc", max_new_tokens=12, temperature=0,
                                             ignore_eos=True, stop_token_ids=(ref[k],)), \
            FinishReason.STOP, k + 1
    async with running() as (engine, shards, ends):
        if how == "stop string":
            text = text_of(await drain(await engine.submit(GenerateRequest(
                prompt="abc", max_new_tokens=12, temperature=0, ignore_eos=True))))
            request, reason = GenerateRequest(prompt="abc", max_new_tokens=12, temperature=0,
                                              ignore_eos=True, stop=(text[4:6],)), \
                FinishReason.STOP
        stream = await engine.submit(request)
        chunks = await drain(stream)
        stream.close()  # as every adapter does, after the end too: changes nothing
        last = chunks[-1]
        assert last.finish is not None and last.finish.reason is reason
        assert last.usage is not None
        if how == "stop string":
            assert text_of(chunks) == text[:text.index(text[4:6])]
        else:
            assert ids_of(chunks) == (greedy_reference(EOS_PROMPT, 40) if how == "eos"
                                      else ref[:n])
            assert last.usage.generated_tokens == n
        await assert_ended_once(engine, shards, ends, stream.seq.seq_id, reason, releases=1)


async def test_a_cancel_while_waiting_never_reaches_the_shards() -> None:
    async with running() as (engine, shards, ends):
        stream = await engine.submit(GenerateRequest(prompt="ab", max_new_tokens=50))
        stream.close()
        stream.close()
        chunks = await drain(stream)
        assert len(chunks) == 1 and chunks[0].finish is not None
        assert chunks[0].finish.reason is FinishReason.CANCELLED
        await assert_ended_once(engine, shards, ends, stream.seq.seq_id, FinishReason.CANCELLED,
                                releases=0)
        assert all(w.seq_id != stream.seq.seq_id for _, work in shards.steps for w in work)


async def test_a_cancel_while_running_releases_once() -> None:
    async with running() as (engine, shards, ends):
        stream = await engine.submit(GenerateRequest(prompt="ab", max_new_tokens=200,
                                                     ignore_eos=True))
        async with asyncio.timeout(5):
            async for chunk in stream:
                if chunk.token_ids:
                    break
        stream.close()
        stream.close()
        assert reason_of(await drain(stream)) is FinishReason.CANCELLED
        await assert_ended_once(engine, shards, ends, stream.seq.seq_id, FinishReason.CANCELLED,
                                releases=1)


async def test_a_cancel_while_its_last_text_is_detokenized_ends_it_once() -> None:
    tokenizer = GatedTokenizer()
    tokenizer.gate, tokenizer.final_only = asyncio.Event(), True
    async with running(tokenizer) as (engine, shards, ends):
        stream = await engine.submit(GenerateRequest(prompt="abc", max_new_tokens=4,
                                                     temperature=0, ignore_eos=True))
        seq_id = stream.seq.seq_id
        async with asyncio.timeout(5):
            await tokenizer.held.wait()  # its length stop is decided; its last text is held
            while not any(seq_id in r for r in shards.releases):
                await asyncio.sleep(0.001)  # out of the steps already: its KV is released
        stream.close()
        tokenizer.gate.set()
        chunks = await drain(stream)
        assert chunks[-1].finish is not None
        assert chunks[-1].finish.reason is FinishReason.CANCELLED
        assert chunks[-1].usage is not None and chunks[-1].usage.generated_tokens == 4
        tokenizer.gate = None
        await assert_ended_once(engine, shards, ends, seq_id, FinishReason.CANCELLED, releases=1)


async def test_a_tokenizer_failure_after_a_cancel_counts_the_end_once() -> None:
    tokenizer = GatedTokenizer()
    async with running(tokenizer) as (engine, shards, ends):
        tokenizer.gate = asyncio.Event()
        stream = await engine.submit(GenerateRequest(prompt="abc", max_new_tokens=50,
                                                     ignore_eos=True))
        async with asyncio.timeout(5):
            await tokenizer.held.wait()  # its first text is being detokenized
        stream.close()
        tokenizer.fail = Unavailable("tokenizer fake-tokenizer:1 failed: gone")
        tokenizer.gate.set()
        assert reason_of(await drain(stream)) is FinishReason.CANCELLED
        async with asyncio.timeout(5):
            while stream.seq.seq_id in shards.seqs:
                await asyncio.sleep(0.001)
        tokenizer.fail, tokenizer.gate = None, None
        assert engine.stats.finished == Counter({"cancelled": 1})
        await assert_ended_once(engine, shards, ends, stream.seq.seq_id, FinishReason.CANCELLED,
                                releases=1)


async def test_a_tokenizer_failure_ends_its_requests_once() -> None:
    tokenizer = FakeTokenizer()
    async with running(tokenizer) as (engine, shards, ends):
        stream = await engine.submit(GenerateRequest(prompt="ab", max_new_tokens=50,
                                                     ignore_eos=True))
        async with asyncio.timeout(5):
            async for chunk in stream:
                if chunk.token_ids:
                    break
        tokenizer.fail = Unavailable("tokenizer fake-tokenizer:1 failed: gone")
        last = (await drain(stream))[-1]
        tokenizer.fail = None
        assert isinstance(last.error, Unavailable)
        assert last.finish is not None and last.finish.reason is FinishReason.ERROR
        stream.close()
        await assert_ended_once(engine, shards, ends, stream.seq.seq_id, FinishReason.ERROR,
                                releases=1)


async def test_a_step_failure_ends_every_request_once_and_the_reset_frees_their_kv() -> None:
    async with running() as (engine, shards, ends):
        streams = [await engine.submit(GenerateRequest(prompt="ab", max_new_tokens=100,
                                                       ignore_eos=True)) for _ in range(3)]
        shards.fail_at_step = shards.next_step_id + 3
        for stream in streams:
            last = (await drain(stream))[-1]
            assert last.finish is not None and last.finish.reason is FinishReason.ERROR
            stream.close()
        resets = shards.resets
        shards.fail_at_step, shards.healthy = None, True
        async with asyncio.timeout(5):
            while not engine.serving:
                await asyncio.sleep(0.001)
        assert shards.resets == resets + 1
        for stream in streams:
            await assert_ended_once(engine, shards, ends, stream.seq.seq_id, FinishReason.ERROR,
                                    releases=0)
        assert engine.stats.finished["error"] == 3
