"""The server bootstrap, served for real on port 0 in process: health, error mapping, garbage
bytes, message limits, reflection.

Graceful stop on SIGTERM is in test_server_shutdown.py, mTLS in test_server_tls.py; the tiny
servicers and call helpers are in tiny_server.py.
"""

from __future__ import annotations

import grpc
import pytest

from services.pb.cpumesh.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from services.server import bind
from services.transport import server_options
from tests.service.tiny_server import (
    NOT_SERVING,
    ROUTER,
    RPC_TIMEOUT,
    SERVING,
    TOKENIZER,
    TinyRouter,
    TinyTokenizer,
    collect,
    encode,
    health_of,
    rpc_error,
    run,
    serving,
)


def test_serves_on_port_zero_with_health() -> None:
    async def body() -> None:
        async with serving(bind(TinyTokenizer(), TOKENIZER)) as (server, port):
            assert port > 0
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
                reply = await stub.Encode(encode("hé", ""), timeout=RPC_TIMEOUT)
                assert [list(r.token_ids) for r in reply.results] == [[104, 195, 169], []]
                assert [r.count for r in reply.results] == [3, 0]

                assert await health_of(channel) == SERVING
                assert await health_of(channel, TOKENIZER.full_name) == SERVING
                await server.set_serving(False)
                assert await health_of(channel) == NOT_SERVING
                assert await health_of(channel, TOKENIZER.full_name) == NOT_SERVING
                await server.set_serving(True, TOKENIZER.full_name)
                assert await health_of(channel, TOKENIZER.full_name) == SERVING
                assert await health_of(channel) == NOT_SERVING
                err = await rpc_error(health_of(channel, "no.such.Service"))
                assert err.code() == grpc.StatusCode.NOT_FOUND
    run(body())


def test_errors_arrive_with_their_status_codes(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        services = (bind(TinyTokenizer(), TOKENIZER), bind(TinyRouter(), ROUTER))
        async with serving(*services) as (_, port), \
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            router = router_pb2_grpc.RouterServiceStub(channel)
            chat = tokenizer_pb2.EncodeRequest(items=[tokenizer_pb2.EncodeItem(
                chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user")]))])
            cases = [
                (tokenizer.Encode(chat, timeout=RPC_TIMEOUT), grpc.StatusCode.INVALID_ARGUMENT,
                 "item 0: this tokenizer has no chat template"),
                (tokenizer.Encode(encode("ok", "busy"), timeout=RPC_TIMEOUT),
                 grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full"),
                (tokenizer.Encode(encode("bug"), timeout=RPC_TIMEOUT), grpc.StatusCode.INTERNAL,
                 "ZeroDivisionError: a bug in the servicer"),
                (tokenizer.Decode(tokenizer_pb2.DecodeRequest(), timeout=RPC_TIMEOUT),
                 grpc.StatusCode.UNIMPLEMENTED, ""),
            ]
            for call, code, details in cases:
                err = await rpc_error(call)
                assert err.code() == code, err
                assert details in (err.details() or "")

            stream_cases = [("ab!c", "ab", grpc.StatusCode.UNAVAILABLE, "shard 1 is down"),
                            ("?", "", grpc.StatusCode.INTERNAL, "KeyError")]
            for prompt, before, code, details in stream_cases:
                call = router.Generate(router_pb2.GenerateRequest(prompt=prompt),
                                       timeout=RPC_TIMEOUT)
                received = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for chunk in call:
                        received.append(chunk.text)
                assert "".join(received) == before  # chunks before the error arrive first
                assert info.value.code() == code and details in (info.value.details() or "")

            chunks = await collect(router.Generate(router_pb2.GenerateRequest(prompt="hey"),
                                                   timeout=RPC_TIMEOUT))
            assert "".join(c.text for c in chunks) == "hey"
            assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    run(body())
    # Unknown exceptions are logged with their traceback; CpumeshErrors are not.
    logged = [r for r in caplog.records if r.name == "services.server"]
    assert [r.getMessage() for r in logged] == [
        "unhandled error in /cpumesh.v1.TokenizerService/Encode",
        "unhandled error in /cpumesh.v1.RouterService/Generate"]
    assert all(r.exc_info for r in logged)
    assert "ZeroDivisionError: a bug in the servicer" in caplog.text


def test_garbage_bytes_get_invalid_argument_and_oversized_resource_exhausted() -> None:
    async def body() -> None:
        services = (bind(TinyTokenizer(), TOKENIZER), bind(TinyRouter(), ROUTER))
        options = server_options(max_message_bytes=4096)
        async with serving(*services, options=options) as (_, port), \
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            encode_raw = channel.unary_unary("/cpumesh.v1.TokenizerService/Encode")
            generate_raw = channel.unary_stream("/cpumesh.v1.RouterService/Generate")
            for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05ab"):
                err = await rpc_error(encode_raw(garbage, timeout=RPC_TIMEOUT))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
                assert "cpumesh.v1.EncodeRequest" in (err.details() or "")
                err = await rpc_error(collect(generate_raw(garbage, timeout=RPC_TIMEOUT)))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            # Valid bytes through the same raw path still work.
            reply = await encode_raw(encode("ok").SerializeToString(), timeout=RPC_TIMEOUT)
            assert tokenizer_pb2.EncodeResponse.FromString(reply).results[0].count == 2

            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            err = await rpc_error(stub.Encode(encode("x" * 8192), timeout=RPC_TIMEOUT))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    run(body())


def test_reflection_lists_the_services_when_enabled() -> None:
    reflection_pb2 = pytest.importorskip("grpc_reflection.v1alpha.reflection_pb2")
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    async def body() -> None:
        async with serving(bind(TinyTokenizer(), TOKENIZER), reflection=True) as (_, port), \
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol=TOKENIZER.full_name)]
            replies = await collect(stub.ServerReflectionInfo(iter(requests),
                                                              timeout=RPC_TIMEOUT))
            names = {s.name for s in replies[0].list_services_response.service}
            assert {TOKENIZER.full_name, "grpc.health.v1.Health"} <= names
            assert replies[1].file_descriptor_response.file_descriptor_proto
    run(body())
