"""Killing a shard of a running SmolLM2 cluster: its streams fail fast and name it, the router
turns not ready, and it recovers without a restart once the shard group comes back.

It runs after the other router end-to-end files (by file name), as it restarts the shards.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import grpc
import pytest

from tests.e2e.router_cluster import NEW, PROMPT, SERVING, Cluster, until_kv_free
from tests.procs import wait_serving
from tools.client import RouterClient

pytestmark = pytest.mark.asyncio


async def test_killing_a_shard_fails_streams_fast_and_the_router_recovers(
        cluster_of: Callable[[int], Cluster],
        reference: dict[str, tuple[list[int], str]]) -> None:
    c = cluster_of(2)
    async with RouterClient(c.router_addr) as client:
        progress = [0, 0]

        async def stream(i: int) -> None:
            async for r in client.generate(PROMPT, max_new_tokens=500, ignore_eos=True,
                                           timeout=120):
                progress[i] += len(r.token_ids)

        tasks = [asyncio.ensure_future(stream(i)) for i in range(2)]
        async with asyncio.timeout(60):
            while min(progress) < 3:
                await asyncio.sleep(0.01)
        c.shards[1].signal(signal.SIGKILL)
        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        elapsed = time.perf_counter() - t0
        for r in results:
            assert isinstance(r, grpc.aio.AioRpcError), r
            assert r.code() == grpc.StatusCode.UNAVAILABLE, r
            # The killed shard is named: by its address when the router sees its link drop
            # first, or as "rank 1" when its surviving peer reports the broken mesh first.
            details = r.details() or ""
            assert c.shard_addrs[1] in details or "rank 1" in details, details
        assert elapsed < 3.0, elapsed
        assert await client.health() != SERVING
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.complete(PROMPT, max_new_tokens=2, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert c.shards[1].proc is not None
        c.shards[1].proc.wait(10)
        # The group comes back whole (as Kubernetes replaces it), at the same addresses; the
        # router itself is not restarted.
        c.shards[0].stop()
        for s in c.shards:
            s.start()
        wait_serving(c.router_addr, c.router, deadline_s=120)
        again = await client.complete(PROMPT, max_new_tokens=NEW, temperature=0, timeout=60)
        assert again.token_ids == reference["prompt"][0]
        await until_kv_free(c)
