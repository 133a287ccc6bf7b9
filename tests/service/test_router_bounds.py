"""The router's bounds before work, served for real in process: the engine over the in-memory
shards and a tokenizer that counts (and can hold) its Encode calls, its gRPC service and its HTTP
API on port 0, driven by the gRPC client and the official `openai` client.

What is checked is what reaches the tokenizer: an over-long prompt or chat never does; of a burst
of 4 x max-waiting requests exactly the excess is refused and only the admitted ones are
tokenized (and complete), and while the queue is full a request is refused before it is read
(garbage bytes, an HTTP body: RESOURCE_EXHAUSTED, 429) without changing the queue; the
(cap+1)-th concurrent request is refused; a body over the limit is 413 unread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

import aiohttp
import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router_svc.config import PROMPT_BYTES_PER_TOKEN, RouterConfig
from router_svc.engine import Engine
from router_svc.http_api import HttpApi
from router_svc.metrics import RouterMetrics
from router_svc.servicer import RouterServicer
from services.pb.cpumesh.v1 import router_pb2
from services.server import bind, create_server
from services.transport import server_options
from tests.unit.router_fakes import FakeShards, FakeTokenizer
from tools.client import RouterClient

pytestmark = pytest.mark.asyncio
CONTEXT = 512  # FakeShards' max_context
PROMPT_LIMIT = CONTEXT * PROMPT_BYTES_PER_TOKEN
CONFIG = RouterConfig(tokenizer="fake:1", shards=("fake-shard-0:1", "fake-shard-1:1"),
                      health_interval_s=0.05, recover_poll_s=0.01, max_waiting=4,
                      max_running=8, prefill_token_budget=64)
DEADLINE = 30.0


class CountingTokenizer(FakeTokenizer):
    """Counts Encode calls; while `held` is set, each waits for `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.encodes = 0
        self.held = False
        self.release = asyncio.Event()

    async def encode(self, prompt: str | None, messages: Sequence[tuple[str, str]] | None,
                     timeout: float) -> list[int]:
        self.encodes += 1
        if self.held:
            await self.release.wait()
        return await super().encode(prompt, messages, timeout)


@dataclass
class Router:
    engine: Engine
    tokenizer: CountingTokenizer
    grpc_address: str
    http: str

    def openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.http}/v1", api_key="unused", max_retries=0)


@contextlib.asynccontextmanager
async def router(config: RouterConfig = CONFIG) -> AsyncIterator[Router]:
    tokenizer = CountingTokenizer()
    engine = Engine(config, FakeShards(), tokenizer)  # type: ignore[arg-type]
    service = bind(RouterServicer(engine, config.max_running),
                   router_pb2.DESCRIPTOR.services_by_name["RouterService"])
    server, port = create_server(service, options=server_options(
        max_message_bytes=config.max_request_bytes))  # as router_svc/service.py
    await server.start()
    http, http_port = await HttpApi(engine, RouterMetrics(engine)).start("127.0.0.1", 0, 1.0)
    run = asyncio.ensure_future(engine.run())
    try:
        async with asyncio.timeout(DEADLINE):
            while not engine.serving:
                await asyncio.sleep(0.005)
        yield Router(engine, tokenizer, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}")
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        await http.cleanup()
        await server.stop(0)


async def grpc_error(client: RouterClient, prompt: str | None = None,
                     **params: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.complete(prompt, timeout=DEADLINE, **params)
    return e.value


async def test_over_long_prompts_and_chats_never_reach_the_tokenizer() -> None:
    async with router() as r, RouterClient(r.grpc_address) as client:
        # At the limit (2-byte characters): tokenized, then too many tokens for the context.
        e = await grpc_error(client, "é" * (PROMPT_LIMIT // 2), max_new_tokens=1)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "context length" in e.details()
        assert r.tokenizer.encodes == 1
        refused: list[tuple[dict[str, object], str]] = [
            (dict(prompt="é" * (PROMPT_LIMIT // 2) + "a"), "prompt is over the limit of "
             f"{PROMPT_LIMIT} UTF-8 bytes (--max-prompt-bytes)"),
            (dict(prompt="a" * 2_000_000), "input: the request is"),  # refused unparsed
            (dict(messages=[("user", "")] * 4097), "chat.messages has 4097 messages, more than "
             "the limit of 4096 (--max-chat-messages)"),
            (dict(messages=[("user", "")] * 200_000), "input: the request is"),
            (dict(messages=[("user", "a" * 1000)] * 20), "chat.messages (their roles and "
             "contents together) is over the limit")]
        for params, message in refused:
            e = await grpc_error(client, **params)
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, e)
            assert (e.details() or "").startswith(message), e.details()
        async with r.openai() as oa:
            with pytest.raises(openai.BadRequestError) as bad:
                await oa.chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": ""}] * 4097)
            assert bad.value.status_code == 400 and bad.value.param == "messages"
            assert "--max-chat-messages" in bad.value.message
            with pytest.raises(openai.BadRequestError) as bad:
                await oa.completions.create(model="fake-model", prompt="a" * (PROMPT_LIMIT + 1))
            assert bad.value.param == "prompt" and "--max-prompt-bytes" in bad.value.message
        assert r.tokenizer.encodes == 1
        ok = await client.complete("hello", max_new_tokens=3, timeout=DEADLINE)
        assert ok.finish_name == "length" and len(ok.token_ids) == 3


async def test_a_burst_of_four_times_max_waiting_refuses_exactly_the_excess() -> None:
    async with router() as r, RouterClient(r.grpc_address) as client:
        r.tokenizer.held = True  # the admitted stay in Encode, holding their waiting slots
        n = 4 * CONFIG.max_waiting
        calls = [asyncio.ensure_future(client.complete(f"burst {chr(97 + i)}", max_new_tokens=4,
                                                       timeout=DEADLINE)) for i in range(n)]
        async with asyncio.timeout(DEADLINE):  # the excess is refused while the rest wait
            while sum(c.done() for c in calls) < n - CONFIG.max_waiting:
                await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED, timeout=1)
        refused = [c.exception() for c in calls if c.done()]
        assert all(isinstance(e, grpc.aio.AioRpcError)
                   and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused), refused
        assert r.tokenizer.encodes == CONFIG.max_waiting
        s = r.engine.scheduler
        assert s is not None and (s.num_waiting, s.num_reserved_waiting) == (0, CONFIG.max_waiting)
        # While the queue is full a request is refused before it is read: bytes that are no
        # request at all, and an HTTP body, get RESOURCE_EXHAUSTED / 429 too.
        garbage = client.channel.unary_stream("/cpumesh.v1.RouterService/Generate")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in garbage(b"\xff not a GenerateRequest", timeout=DEADLINE):
                pass
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.details() == f"waiting queue full ({CONFIG.max_waiting} requests)"
        async with r.openai() as oa:
            with pytest.raises(openai.RateLimitError) as limited:
                await oa.completions.create(model="fake-model", prompt="burst", max_tokens=2)
            assert "waiting queue full" in limited.value.message
        assert (s.num_waiting, s.num_reserved_waiting) == (0, CONFIG.max_waiting)  # unchanged
        assert r.engine.admission.requests == CONFIG.max_waiting
        assert r.tokenizer.encodes == CONFIG.max_waiting
        r.tokenizer.release.set()
        async with asyncio.timeout(DEADLINE):
            admitted = await asyncio.gather(*[c for c in calls if not c.done()])
        assert len(admitted) == CONFIG.max_waiting
        assert all(a.finish_name == "length" and len(a.token_ids) == 4 for a in admitted)
        assert r.tokenizer.encodes == CONFIG.max_waiting
        assert (s.num_waiting, s.num_reserved_waiting) == (0, 0)
        assert (r.engine.admission.requests, r.engine.admission.bytes) == (0, 0)
        # Each refusal is in cpumesh_refusal_seconds, by api: the burst's excess and the
        # garbage over gRPC, the body over HTTP; the admitted ones are not.
        assert await refusals(r) == {"grpc": n - CONFIG.max_waiting + 1, "http": 1}


async def refusals(r: Router) -> dict[str, float]:
    """cpumesh_refusal_seconds' count by api, from GET /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"{r.http}/metrics") as response:
        text = await response.text()
    return {s.labels["api"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "cpumesh_refusal_seconds_count"}


async def test_the_in_flight_caps_refuse_the_next_request() -> None:
    config = replace(CONFIG, max_inflight_requests=2, max_inflight_bytes=200_000,
                     max_request_bytes=150_000, max_prompt_bytes=150_000)
    async with router(config) as r, RouterClient(r.grpc_address) as client:
        r.tokenizer.held = True
        held = [asyncio.ensure_future(client.complete(p, max_new_tokens=2, timeout=DEADLINE))
                for p in ("first", "second")]
        async with asyncio.timeout(DEADLINE):
            while r.tokenizer.encodes < 2:
                await asyncio.sleep(0.005)
        e = await grpc_error(client, "third", max_new_tokens=2)
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the limit is 2 (--max-inflight-requests)" in (e.details() or "")
        async with r.openai() as oa:
            with pytest.raises(openai.RateLimitError) as limited:
                await oa.completions.create(model="fake-model", prompt="third", max_tokens=2)
            assert "--max-inflight-requests" in limited.value.message
            assert r.tokenizer.encodes == 2
            r.tokenizer.release.set()
            async with asyncio.timeout(DEADLINE):
                done = await asyncio.gather(*held)
            assert [len(d.token_ids) for d in done] == [2, 2]
            # Tickets came back: a held request of 120 kB leaves no room for another 100 kB.
            r.tokenizer.held, r.tokenizer.release = True, asyncio.Event()
            big = asyncio.ensure_future(client.complete(
                "a" * 120_000, max_new_tokens=2, timeout=DEADLINE))
            async with asyncio.timeout(DEADLINE):
                while r.tokenizer.encodes < 3:
                    await asyncio.sleep(0.005)
            with pytest.raises(openai.RateLimitError) as limited:
                await oa.completions.create(model="fake-model", prompt="b" * 100_000)
            assert "--max-inflight-bytes" in limited.value.message
            r.tokenizer.release.set()
            async with asyncio.timeout(DEADLINE):
                with pytest.raises(grpc.aio.AioRpcError):  # 120,000 tokens: over the context
                    await big
            ok = await oa.completions.create(model="fake-model", prompt="b" * 100, max_tokens=2)
            assert ok.choices[0].finish_reason == "length"
        assert (r.engine.admission.requests, r.engine.admission.bytes) == (0, 0)
        assert await refusals(r) == {"grpc": 1, "http": 2}  # the caps' refusals are timed too


async def test_a_body_over_the_limit_is_413_unread() -> None:
    config = replace(CONFIG, max_request_bytes=64 * 1024)
    async with router(config) as r, r.openai() as oa:
        with pytest.raises(openai.APIStatusError) as too_large:
            await oa.completions.create(model="fake-model", prompt="a" * 70_000)
        assert too_large.value.status_code == 413
        body = too_large.value.body
        assert isinstance(body, dict) and body["type"] == "invalid_request_error"
        assert body["code"] == 413 and "--max-request-bytes 65536" in body["message"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: read up to the limit
            yield b'{"prompt": "'
            for _ in range(100):
                yield b"a" * 1000
            yield b'"}'

        async with aiohttp.ClientSession() as s, s.post(f"{r.http}/v1/completions",
                                                        data=chunks()) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == 413
        assert r.tokenizer.encodes == 0
        ok = await oa.completions.create(model="fake-model", prompt="a" * 100, max_tokens=2)
        assert ok.choices[0].finish_reason == "length"
        assert (r.engine.admission.requests, r.engine.admission.bytes) == (0, 0)
    async with router() as r, RouterClient(r.grpc_address) as client:  # gRPC: its own limit
        e = await grpc_error(client, "a" * (CONFIG.max_request_bytes + 1))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert r.tokenizer.encodes == 0
