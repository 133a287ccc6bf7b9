"""The router's limits, against a running SmolLM2 cluster: each invalid parameter gets
INVALID_ARGUMENT, a full waiting queue is refused at once, and cancels and deadlines free the
KV cache within one step without disturbing the other streams.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import pytest

from tests.e2e.router_cluster import CONTEXT, PROMPT, SERVING, Cluster, complete, until_kv_free
from tests.procs import health_status
from tools.client import RouterClient

pytestmark = pytest.mark.asyncio


INVALID = [  # (params, the field named in the error)
    (dict(prompt=""), "prompt"),
    (dict(prompt=None, messages=[]), "chat.messages"),
    (dict(temperature=-1.0), "sampling.temperature"),
    (dict(temperature=float("nan")), "sampling.temperature"),
    (dict(top_p=0.0), "sampling.top_p"),
    (dict(top_p=1.01), "sampling.top_p"),
    (dict(top_k=5000), "sampling.top_k"),
    (dict(max_new_tokens=0), "sampling.max_new_tokens"),
    (dict(max_new_tokens=CONTEXT + 1), "sampling.max_new_tokens"),
    (dict(prompt="word " * 600, max_new_tokens=500), "prompt"),
    (dict(stop=["a", "b", "c", "d", "e"]), "sampling.stop"),
    (dict(stop=[""]), "sampling.stop[0]"),
    (dict(stop_token_ids=[49152]), "sampling.stop_token_ids[0]"),
    (dict(logprobs=True, top_logprobs=21), "sampling.top_logprobs"),
    (dict(top_logprobs=2), "sampling.top_logprobs"),
    (dict(prompt=None, messages=[("", "hi")]), "chat.messages[0].role"),
    (dict(prompt=None, messages=[("wizard", "hi")]), "chat"),
    (dict(request_id="bad\nid"), "request_id"),
]


async def test_each_invalid_parameter_gets_invalid_argument(
        cluster_of: Callable[[int], Cluster]) -> None:
    c = cluster_of(2)
    async with RouterClient(c.router_addr) as client:
        for params, field in INVALID:
            p = {"prompt": PROMPT, **params}
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.complete(timeout=30, **p)  # type: ignore[arg-type]
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (params, e.value)
            assert (e.value.details() or "").startswith(field), (params, e.value.details())
        garbage = client.channel.unary_stream("/cpumesh.v1.RouterService/Generate")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in garbage(b"\xff\xff\xff", timeout=10):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert health_status(c.router_addr) == SERVING


async def test_full_queue_is_refused_at_once_and_cancels_free_the_kv(
        cluster_of: Callable[[int], Cluster]) -> None:
    c = cluster_of(2)
    async with RouterClient(c.router_addr) as client:
        # Sixteen of these fill the batch (--max-running 16; KV pages are taken as they grow,
        # so the KV cache no longer bounds it); eight more fill the queue.
        async def long(i: int) -> None:
            async for _ in client.generate("Hello", max_new_tokens=1000, ignore_eos=True,
                                           request_id=f"long-{i}", timeout=120):
                pass

        tasks = []
        for i in range(24):
            tasks.append(asyncio.ensure_future(long(i)))
            await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.complete("Hello", max_new_tokens=5, timeout=30)
        assert time.perf_counter() - t0 < 1.0
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "waiting queue full (8 requests)" in (e.value.details() or "")
        assert all(not t.done() for t in tasks)
        assert await c.kv_used() != [0] * len(c.shards)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await until_kv_free(c)


async def test_cancel_and_deadline_free_the_kv_within_one_step(
        cluster_of: Callable[[int], Cluster]) -> None:
    c = cluster_of(2)
    other_params = dict(max_new_tokens=40, temperature=0, ignore_eos=True)
    solo = await complete(c, "Hi", **other_params)  # type: ignore[arg-type]
    async with RouterClient(c.router_addr) as client:
        other_tokens: list[int] = []

        async def other() -> None:
            async for r in client.generate("Hi", timeout=120, **other_params):  # type: ignore
                other_tokens.extend(r.token_ids)

        other_task = asyncio.ensure_future(other())
        victim = client.generate("Tell me a long story. " * 30, max_new_tokens=500,
                                 ignore_eos=True, timeout=120)
        got = 0
        async for r in victim:
            got += len(r.token_ids)
            if got >= 3:
                break
        assert min(await c.kv_used()) >= 150  # the victim's prompt holds its pages
        at_cancel = len(other_tokens)
        await victim.aclose()  # cancels the call
        async with asyncio.timeout(5):
            while max(await c.kv_used()) > 48:  # only the other one's pages (<= 3) remain
                await asyncio.sleep(0.005)
        assert len(other_tokens) - at_cancel <= 2, "released within one step"
        # A deadline passing mid-stream is a cancel too.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.complete("Tell me a long story.", max_new_tokens=500,
                                  ignore_eos=True, timeout=1.0)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await other_task
        assert other_tokens == solo.token_ids, "the others are not disturbed"
        await until_kv_free(c)
