"""A whole cpumesh system over real processes on loopback, for the router end-to-end tests.

Cluster runs a tokenizer, a router and `tp` SmolLM2 shards, all holding one internal token file
(so that every router test also runs through the token's client and server interceptors). Shards
are limited to a context of 1024 and a KV cache of 2048 tokens, so that the limits are cheap to
reach. The shared running cluster is the `cluster_of` fixture in conftest.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from services.pb.cpumesh.v1 import shard_pb2, shard_pb2_grpc
from tests.procs import Service, free_ports, wait_serving
from tools.client import Completion, RouterClient

CONTEXT, KV, PAGE = 1024, 2048, 16
PROMPT = "The capital of France is"


CHAT = [("user", "What is the capital of France? Answer in one sentence.")]
NEW = 20
INTERNAL_TOKEN = "router-cluster-internal-token"
SERVING = health_pb2.HealthCheckResponse.SERVING


class Cluster:
    def __init__(self, model_dir: Path, tp: int, log_dir: Path, kv: int = KV,
                 shard_args: tuple[str, ...] = (), router_args: tuple[str, ...] = ()) -> None:
        ports = free_ports(2 + 2 * tp)
        self.tokenizer_addr, self.router_addr = (f"127.0.0.1:{p}" for p in ports[:2])
        self.shard_addrs = [f"127.0.0.1:{p}" for p in ports[2:2 + tp]]
        peers = ",".join(f"127.0.0.1:{p}" for p in ports[2 + tp:])
        self.log_dir = log_dir
        (log_dir / "internal-token").write_text(INTERNAL_TOKEN + "\n")
        token = ["--internal-token-file", str(log_dir / "internal-token")]
        self.tokenizer = Service("tokenizer", [
            "-m", "tokenizer_svc", "--model-dir", str(model_dir), "--listen", self.tokenizer_addr,
            *token], log_dir)
        self.shards = [Service(f"shard{r}", [
            "-m", "shard_svc", "--model-dir", str(model_dir), "--tp-size", str(tp),
            "--tp-rank", str(r), "--peers", peers, "--listen", a, "--threads", "1",
            "--kv-capacity-tokens", str(kv), "--kv-page-size", str(PAGE),
            "--max-context", str(CONTEXT), "--mesh-timeout", "60", *token, *shard_args], log_dir)
            for r, a in enumerate(self.shard_addrs)]
        self.router = Service("router", [
            "-m", "router_svc", "--tokenizer", self.tokenizer_addr,
            "--shards", ",".join(self.shard_addrs), "--listen", self.router_addr,
            "--max-waiting", "8", "--max-running", "16", "--max-stop-strings", "4", *token,
            *router_args], log_dir)

    def start(self) -> Cluster:
        for s in [self.tokenizer, *self.shards, self.router]:
            s.start()
        wait_serving(self.router_addr, self.router, deadline_s=180)
        return self

    def stop(self) -> None:
        for s in [self.router, *self.shards, self.tokenizer]:
            s.stop()

    def router_log(self) -> str:
        return self.router.log_path.read_text()

    async def kv_used(self) -> list[int]:
        """KV tokens in use on each shard, from its Info."""
        used = []
        for a in self.shard_addrs:
            async with grpc.aio.insecure_channel(a) as channel:
                info = await shard_pb2_grpc.ShardServiceStub(channel).Info(
                    shard_pb2.ShardInfoRequest(), timeout=5,
                    metadata=(("authorization", f"Bearer {INTERNAL_TOKEN}"),))
                used.append(info.kv_capacity_tokens - info.kv_free_tokens)
        return used


async def until_kv_free(c: Cluster, timeout: float = 5.0) -> None:
    """Every shard's KV cache empties (a finished stream is released before the next step)."""
    async with asyncio.timeout(timeout):
        while await c.kv_used() != [0] * len(c.shards):
            await asyncio.sleep(0.01)


async def complete(c: Cluster, prompt: str | None = PROMPT, **params: object) -> Completion:
    async with RouterClient(c.router_addr) as client:
        return await client.complete(prompt, timeout=120, **params)
