"""Tiny in-process servers for the server bootstrap tests: servicers, and helpers to call them.

TinyTokenizer and TinyRouter are small real implementations of one RPC each of the tokenizer
and router shapes; `serving` runs them with the real bootstrap on port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.pb.cpumesh.v1 import common_pb2, router_pb2, tokenizer_pb2
from services.server import BoundService, Server, create_server

T = TypeVar("T")
TOKENIZER = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"]
ROUTER = router_pb2.DESCRIPTOR.services_by_name["RouterService"]
RPC_TIMEOUT = 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class TinyTokenizer:
    """Encode only: a text's UTF-8 bytes are its token ids. Some texts stand for failures."""

    async def Encode(self, request: tokenizer_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> tokenizer_pb2.EncodeResponse:
        results = []
        for i, item in enumerate(request.items):
            if item.WhichOneof("input") != "text":
                raise InvalidArgument(f"item {i}: this tokenizer has no chat template")
            if item.text == "busy":
                raise ResourceExhausted("queue is full")
            if item.text == "bug":
                raise ZeroDivisionError("a bug in the servicer")
            ids = list(item.text.encode())
            results.append(tokenizer_pb2.EncodeResult(token_ids=ids, count=len(ids)))
        return tokenizer_pb2.EncodeResponse(results=results)


class TinyRouter:
    """Generate only: streams the prompt back one character per chunk, `delay_s` apart.

    "!" stands for a shard going down, "?" for a bug, both after the chunks before them."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    async def Generate(self, request: router_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[router_pb2.GenerateResponse]:
        for ch in request.prompt:
            if ch == "!":
                raise Unavailable("shard 1 is down")
            if ch == "?":
                raise KeyError("a bug in the servicer")
            await asyncio.sleep(self.delay_s)
            yield router_pb2.GenerateResponse(text=ch, token_ids=[ord(ch)])
        yield router_pb2.GenerateResponse(
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(generated_tokens=len(request.prompt)))


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    """Every test body runs under one overall deadline."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def serving(*services: BoundService, **kwargs: Any) -> AsyncIterator[tuple[Server, int]]:
    server, port = create_server(*services, **kwargs)
    await server.start()
    try:
        yield server, port
    finally:
        await server.stop(0)


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service),
                                timeout=RPC_TIMEOUT)
    return int(response.status)


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def collect(call: Any) -> list[Any]:
    """The remaining responses of a stream, by read() (which may follow earlier reads)."""
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


def encode(*texts: str) -> tokenizer_pb2.EncodeRequest:
    return tokenizer_pb2.EncodeRequest(items=[tokenizer_pb2.EncodeItem(text=t) for t in texts])
