"""What the router generates, against a running SmolLM2 cluster: greedy output equals
transformers' (tp 1 and tp 2), concurrent requests equal their solo runs, seeded sampling is
reproducible, and stop strings split across tokens are never streamed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import pytest

from services.pb.cpumesh.v1 import common_pb2
from tests.e2e.router_cluster import CHAT, CONTEXT, KV, NEW, Cluster, complete
from tools.client import Completion, RouterClient

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("tp", [1, 2])
async def test_greedy_equals_transformers(cluster_of: Callable[[int], Cluster],
                                          reference: dict[str, tuple[list[int], str]],
                                          tp: int) -> None:
    c = cluster_of(tp)
    plain = await complete(c, max_new_tokens=NEW, temperature=0)
    chat = await complete(c, None, messages=CHAT, max_new_tokens=NEW, temperature=0)
    for got, name in ((plain, "prompt"), (chat, "chat")):
        ids, text = reference[name]
        assert got.token_ids == ids, name
        assert got.text == text, name
        assert got.usage.generated_tokens == len(ids)
        assert got.finish_name == ("stop" if ids[-1] == 2 else "length")
    assert chat.finish_name == "stop" and chat.stop_token_id == 2
    async with RouterClient(c.router_addr) as client:
        info = await client.model_info()
    assert (info.tp_size, info.vocab_size, info.context_length, info.kv_capacity_tokens) == \
        (tp, 49152, CONTEXT, KV)
    assert info.has_chat_template and 2 in info.eos_token_ids and info.max_batch_size == 16


CONCURRENT = [  # all greedy: each must equal its solo run
    dict(prompt="The capital of France is", max_new_tokens=6),
    dict(prompt="def fibonacci(n):\n   ", max_new_tokens=16, logprobs=True, top_logprobs=2),
    dict(prompt=None, messages=[("user", "Name three colors.")], max_new_tokens=12),
    dict(prompt="Once upon a time", max_new_tokens=14, stop=[" the"]),
    dict(prompt="1, 2, 3, 4,", max_new_tokens=9, top_k=1, temperature=1.3),
    dict(prompt="Résumé: 東京 is a city where 🍣 is", max_new_tokens=11),
    dict(prompt="The quick brown fox", max_new_tokens=4, ignore_eos=True),
    dict(prompt="Paris is", max_new_tokens=15, stop_token_ids=[30]),
]


def same(a: Completion, b: Completion) -> None:
    assert (a.token_ids, a.text, a.finish_reason, a.finish_detail, a.stop_string) == \
        (b.token_ids, b.text, b.finish_reason, b.finish_detail, b.stop_string)
    assert [p.token.token_id for p in a.logprobs] == [p.token.token_id for p in b.logprobs]
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert x.token.logprob == pytest.approx(y.token.logprob, abs=1e-3)
        assert [t.token_id for t in x.top] == [t.token_id for t in y.top]


async def test_concurrent_requests_equal_their_solo_runs(
        cluster_of: Callable[[int], Cluster]) -> None:
    c = cluster_of(2)
    params = [{"temperature": 0.0, **p} for p in CONCURRENT]
    solo = [await complete(c, **p) for p in params]  # type: ignore[arg-type]

    async def staggered(i: int) -> Completion:
        await asyncio.sleep(0.12 * i)
        return await complete(c, request_id=f"batch-{i}", **params[i])  # type: ignore[arg-type]

    batch = await asyncio.gather(*(staggered(i) for i in range(len(params))))
    for s, b in zip(solo, batch, strict=True):
        same(s, b)
    assert len(batch[1].logprobs) == len(batch[1].token_ids) and batch[1].logprobs[0].top
    assert batch[3].finish_name == "stop" and batch[3].stop_string == " the"
    spans = {int(m[1]): (int(m[2]), int(m[3])) for m in re.finditer(
        r"request batch-(\d+) .* steps (\d+)-(\d+);", c.router_log())}
    assert len(spans) == len(params)
    joins, leaves = {j for j, _ in spans.values()}, {v for _, v in spans.values()}
    most_live = max(sum(j <= s < v for j, v in spans.values()) for s in joins)
    assert len(joins) >= 3 and len(leaves) >= 3 and most_live >= 3, spans


async def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(
        cluster_of: Callable[[int], Cluster]) -> None:
    c = cluster_of(2)
    sampled = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, ignore_eos=True)
    a = await complete(c, seed=7, **sampled)  # type: ignore[arg-type]
    b = await complete(c, seed=7, **sampled)  # type: ignore[arg-type]
    others = [await complete(c, seed=s, **sampled) for s in (8, 9)]  # type: ignore[arg-type]
    assert (a.token_ids, a.text) == (b.token_ids, b.text)
    assert any(o.token_ids != a.token_ids for o in others)
    greedy = await complete(c, max_new_tokens=8, temperature=0)
    top1 = await complete(c, max_new_tokens=8, top_k=1, temperature=1.0, seed=3)
    assert top1.token_ids == greedy.token_ids


async def test_stop_strings_split_across_tokens_are_never_streamed(
        cluster_of: Callable[[int], Cluster]) -> None:
    c = cluster_of(2)
    texts: list[str] = []
    async with RouterClient(c.router_addr) as client:
        async for r in client.generate("Once upon a time", max_new_tokens=24, temperature=0,
                                       ignore_eos=True, timeout=60):
            texts.append(r.text)
        full = "".join(texts)
        # the first boundary between two chunks of 2+ characters: end of one, start of the next
        i = next(i for i in range(1, len(texts)) if len(texts[i - 1]) >= 2 and len(texts[i]) >= 2
                 and len("".join(texts[:i])) >= 4)
        stop = texts[i - 1][-2:] + texts[i][:2]
        assert full.index(stop) == len("".join(texts[:i])) - 2
        chunks = [r async for r in client.generate(
            "Once upon a time", max_new_tokens=24, temperature=0, ignore_eos=True,
            stop=["never ever", stop], timeout=60)]
    streamed = "".join(r.text for r in chunks)
    assert streamed == full[:full.index(stop)]
    assert all(stop[:3] not in r.text for r in chunks)
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP and last.stop_string == stop
