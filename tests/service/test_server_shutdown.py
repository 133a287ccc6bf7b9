"""Graceful stop of the server bootstrap: SIGTERM drains in-flight streams within the grace,
the plaintext health port says NOT_SERVING while new calls are refused, and it closes last.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import grpc

from services.pb.cpumesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.server import bind, create_server
from tests.service.tiny_server import (
    NOT_SERVING,
    ROUTER,
    RPC_TIMEOUT,
    SERVING,
    TinyRouter,
    collect,
    health_of,
    run,
)


async def _until(predicate: Callable[[], bool], deadline_s: float = 5.0) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached in time")
        await asyncio.sleep(0.01)


async def _refused(channel: grpc.aio.Channel) -> bool:
    try:
        await health_of(channel)
    except grpc.aio.AioRpcError as e:
        return e.code() == grpc.StatusCode.UNAVAILABLE
    return False


def test_sigterm_drains_in_flight_streams_and_reports_not_serving() -> None:
    async def body() -> None:
        server, port = create_server(bind(TinyRouter(delay_s=0.1), ROUTER),
                                     health_address="127.0.0.1:0")
        await server.start()
        serve = asyncio.create_task(server.serve_until_signal(grace_s=10.0))
        await _until(lambda: signal.getsignal(signal.SIGTERM) != signal.SIG_DFL)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
                assert await health_of(probe) == SERVING
                stream = router_pb2_grpc.RouterServiceStub(channel).Generate(
                    router_pb2.GenerateRequest(prompt="abcdefghij"), timeout=RPC_TIMEOUT)
                first = await stream.read()
                os.kill(os.getpid(), signal.SIGTERM)
                # Draining (about 0.9 s left): the plaintext health port says NOT_SERVING and
                # new calls on the main port are refused, while the stream goes on.
                end = time.monotonic() + RPC_TIMEOUT
                while await health_of(probe) != NOT_SERVING or not await _refused(channel):
                    assert time.monotonic() < end, "not draining after SIGTERM"
                    await asyncio.sleep(0.01)
                assert not serve.done()
                rest = await collect(stream)  # the in-flight stream finishes within the grace
                assert first.text + "".join(c.text for c in rest) == "abcdefghij"
                assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
                assert await asyncio.wait_for(serve, RPC_TIMEOUT) == signal.SIGTERM
                assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler removed
                assert await _refused(probe)  # the health port closes last
        finally:
            serve.cancel()
            await server.stop(0)
    run(body())
