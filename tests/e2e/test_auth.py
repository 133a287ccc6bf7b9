"""Who may call what, over real processes on loopback: a tp-2 group whose tokenizer and shards
hold an internal token file and whose router also holds an API keys file.

* Internal RPCs are not for clients: a Reset, Step, Release or Info to a shard, or an Encode to
  the tokenizer, without the token (or with a wrong one) is UNAUTHENTICATED, also mid-stream, and
  changes nothing: the stream goes on to transformers' greedy ids and the group keeps serving.
  A router with a wrong token never becomes ready.
* The router's clients need an API key: gRPC Generate and ModelInfo get UNAUTHENTICATED without
  one, the HTTP API 401 (the `openai` client's AuthenticationError, code "invalid_api_key");
  with a key both serve the greedy text; health, /health, /ready and /metrics stay open.
* TLS with cert and key but no CA to the shards: `cpumesh router` refuses to start.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2

from services.pb.cpumesh.v1 import (
    router_pb2,
    shard_pb2,
    shard_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from tests.e2e.router_cluster import NEW, PROMPT, SERVING
from tests.procs import Service, free_ports, health_status, wait_serving
from tools.client import RouterClient, generate_request

KEYS = ("first-key-0123456789", "second-key-abcdefghij")
TOKEN = "internal-token-0123456789abcdef"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@dataclass
class Group:
    tokenizer: str
    shards: list[str]
    router: str
    http: str
    services: list[Service]
    log_dir: Path


@pytest.fixture(scope="module")
def group(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    log_dir = tmp_path_factory.mktemp("auth")
    (log_dir / "token").write_text(TOKEN + "\n")
    (log_dir / "keys").write_text("# API keys, one a line\n" + "\n".join(KEYS) + "\n")
    token = ["--internal-token-file", str(log_dir / "token")]
    tok, router, http, s0, s1, m0, m1 = (f"127.0.0.1:{p}" for p in free_ports(7))
    model = ["--model-dir", str(smollm2_dir)]
    services = [Service("tokenizer", ["-m", "tokenizer_svc", *model, "--listen", tok, *token],
                        log_dir)]
    services += [Service(f"shard{r}", [
        "-m", "shard_svc", *model, "--tp-size", "2", "--tp-rank", str(r), "--peers",
        f"{m0},{m1}", "--listen", a, "--threads", "1", "--kv-capacity-tokens", "1024",
        "--max-context", "512", "--mesh-timeout", "60", *token], log_dir)
        for r, a in enumerate((s0, s1))]
    services.append(Service("router", [
        "-m", "router_svc", "--tokenizer", tok, "--shards", f"{s0},{s1}", "--listen", router,
        "--http-listen", http, "--api-keys-file", str(log_dir / "keys"), *token], log_dir))
    try:
        for s in services:
            s.start()
        wait_serving(router, services[-1], deadline_s=180)
        yield Group(tok, [s0, s1], router, f"http://{http}", services, log_dir)
    finally:
        for s in reversed(services):
            s.stop()


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


async def greedy_ids(g: Group, key: str = KEYS[0]) -> list[int]:
    async with RouterClient(g.router) as client:
        call = client.stub.Generate(generate_request(PROMPT, max_new_tokens=NEW, temperature=0),
                                    metadata=bearer(key), timeout=60)
        return [t async for r in call for t in r.token_ids]


async def refused(call: object) -> str:
    """`call` (an awaitable RPC) fails UNAUTHENTICATED; returns its details."""
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call  # type: ignore[misc]
    assert e.value.code() == UNAUTHENTICATED, e.value
    return e.value.details() or ""


@pytest.mark.asyncio
async def test_internal_calls_without_the_token_are_refused_and_change_nothing(
        group: Group, reference: dict[str, tuple[list[int], str]]) -> None:
    expected = reference["prompt"][0]
    async with RouterClient(group.router) as client, \
            grpc.aio.insecure_channel(group.shards[0]) as shard, \
            grpc.aio.insecure_channel(group.tokenizer) as tok_channel:
        stub = shard_pb2_grpc.ShardServiceStub(shard)
        tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(tok_channel)
        call = client.stub.Generate(generate_request(PROMPT, max_new_tokens=NEW, temperature=0),
                                    metadata=bearer(KEYS[0]), timeout=60)
        got: list[int] = []
        async for r in call:
            if not got:  # mid-stream: what broke the group in issue 16
                for metadata in ((), bearer("wrong-token"), bearer(KEYS[0])):
                    details = await refused(stub.Reset(shard_pb2.ResetRequest(next_step_id=0),
                                                       metadata=metadata, timeout=5))
                    assert "/cpumesh.v1.ShardService/Reset" in details
                await refused(stub.Step(shard_pb2.StepRequest(step_id=0), timeout=5))
                await refused(stub.Release(shard_pb2.ReleaseRequest(), timeout=5))
                await refused(stub.Info(shard_pb2.ShardInfoRequest(), timeout=5))
                await refused(tokenizer.Encode(tokenizer_pb2.EncodeRequest(), timeout=5))
                assert health_status(group.shards[0]) == SERVING  # health stays open
                assert health_status(group.tokenizer) == SERVING
            got.extend(r.token_ids)
        assert got == expected
    # The group's state is untouched: every sequence released, and it serves again.
    assert await kv_used_after_release(group.shards) == [0, 0]
    assert await greedy_ids(group, KEYS[1]) == expected


async def kv_used_after_release(shards: list[str], timeout_s: float = 10.0) -> list[int]:
    """Each shard's KV tokens in use (Info, with the token) once the router has released the
    ended sequences, or as they are after `timeout_s`. The router releases a sequence on every
    shard at the top of its next engine step, i.e. just after the stream's last chunk has gone
    to the client: right after the stream, the shards may still hold its pages."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        used = []
        for address in shards:
            async with grpc.aio.insecure_channel(address) as channel:
                info = await shard_pb2_grpc.ShardServiceStub(channel).Info(
                    shard_pb2.ShardInfoRequest(), metadata=bearer(TOKEN), timeout=5)
            used.append(info.kv_capacity_tokens - info.kv_free_tokens)
        if not any(used) or asyncio.get_running_loop().time() > deadline:
            return used
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_router_with_a_wrong_internal_token_is_never_ready(group: Group) -> None:
    (group.log_dir / "wrong").write_text("not-the-token\n")
    address = f"127.0.0.1:{free_ports(1)[0]}"
    router = Service("router-wrong", [
        "-m", "router_svc", "--tokenizer", group.tokenizer, "--shards", ",".join(group.shards),
        "--listen", address, "--internal-token-file", str(group.log_dir / "wrong")],
        group.log_dir).start()
    try:
        async with asyncio.timeout(60):
            while "UNAUTHENTICATED" not in router.log_tail(200):
                assert router.proc is not None and router.proc.poll() is None, router.log_tail()
                await asyncio.sleep(0.2)
        assert health_status(address, "liveness") == SERVING
        assert health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        router.stop()


@pytest.mark.asyncio
async def test_router_grpc_needs_an_api_key(group: Group) -> None:
    async with RouterClient(group.router) as client:
        for metadata in ((), bearer("not-a-key"), (("authorization", KEYS[0]),)):
            details = await refused(client.stub.ModelInfo(
                router_pb2.ModelInfoRequest(), metadata=metadata, timeout=10))
            assert "API key" in details
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in client.stub.Generate(generate_request(PROMPT, max_new_tokens=2),
                                                    metadata=metadata, timeout=10):
                    pass
            assert e.value.code() == UNAUTHENTICATED
        info = await client.stub.ModelInfo(router_pb2.ModelInfoRequest(),
                                           metadata=bearer(KEYS[1]), timeout=10)
        assert info.model_name == "SmolLM2-135M-Instruct"
        assert await client.health() == SERVING


def test_router_http_needs_an_api_key_and_health_stays_open(
        group: Group, reference: dict[str, tuple[list[int], str]]) -> None:
    for key in ("not-a-key", KEYS[0][:-1]):
        api = openai.OpenAI(base_url=f"{group.http}/v1", api_key=key, max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as e:
            api.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=2)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        assert e.value.type == "invalid_request_error"
        with pytest.raises(openai.AuthenticationError):
            api.models.list()
    api = openai.OpenAI(base_url=f"{group.http}/v1", api_key=KEYS[1], max_retries=0, timeout=60)
    done = api.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT,
                                  max_tokens=NEW, temperature=0)
    assert done.choices[0].text == reference["prompt"][1]
    for path in ("/health", "/ready", "/metrics"):
        with urllib.request.urlopen(f"{group.http}{path}", timeout=10) as response:
            assert response.status == 200, path


def test_cpumesh_generate_sends_the_api_key(
        group: Group, reference: dict[str, tuple[list[int], str]], tmp_path: Path) -> None:
    """The console script with --api-key-file (or $CPUMESH_API_KEY) streams the reference text;
    without a key it exits 1 with the router's refusal."""
    cpumesh = str(Path(sys.executable).parent / "cpumesh")
    (tmp_path / "key").write_text(KEYS[0] + "\n")
    base = [cpumesh, "generate", PROMPT, "--router", group.router, "--max-new-tokens", str(NEW),
            "--temperature", "0", "--quiet"]
    out = subprocess.run([*base, "--api-key-file", str(tmp_path / "key")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == reference["prompt"][1]
    env = {k: v for k, v in os.environ.items() if k != "CPUMESH_API_KEY"}
    out = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr, out.stderr
    out = subprocess.run(base, capture_output=True, text=True, timeout=120,
                         env={**env, "CPUMESH_API_KEY": KEYS[1]})
    assert out.returncode == 0 and out.stdout.rstrip("\n") == reference["prompt"][1]


def test_router_tls_without_a_ca_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("unused: refused before it is read\n")
    cpumesh = Path(sys.executable).parent / "cpumesh"
    run = subprocess.run([str(cpumesh), "router", "--tokenizer", "127.0.0.1:1", "--shards",
                          "127.0.0.1:2", "--listen", f"127.0.0.1:{free_ports(1)[0]}",
                          "--tls-cert", str(tmp_path / "cert.pem"),
                          "--tls-key", str(tmp_path / "cert.pem")],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpumesh router: error: "), run.stderr
    assert "--tls-ca" in lines[0] and "plaintext" in lines[0]
