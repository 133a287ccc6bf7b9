"""The server bootstrap, served for real on port 0 in process: health, error mapping, garbage
bytes, message limits, graceful stop on SIGTERM, mTLS with a plaintext health port, reflection.

The servicers are tiny real implementations of one RPC each of the tokenizer and router shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.pb.cpumesh.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from services.server import BoundService, Server, bind, create_server
from services.transport import channel_credentials, server_credentials, server_options

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


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_certs(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all EC P-256."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=cpumesh-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 "-extfile", "san.ext", cwd=d)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mtls_refuses_clients_without_a_certificate_and_health_stays_plaintext(
        tmp_path: Path) -> None:
    _make_certs(tmp_path)
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"

    async def body() -> None:
        credentials = server_credentials(cert, key, ca)
        async with serving(bind(TinyTokenizer(), TOKENIZER), credentials=credentials,
                           health_address="127.0.0.1:0") as (server, port):
            target = f"127.0.0.1:{port}"
            with_cert = channel_credentials(ca, tmp_path / "client.pem", tmp_path / "client.key")
            async with grpc.aio.secure_channel(target, with_cert) as channel:
                reply = await tokenizer_pb2_grpc.TokenizerServiceStub(channel).Encode(
                    encode("tls"), timeout=RPC_TIMEOUT)
                assert reply.results[0].count == 3
            async with grpc.aio.secure_channel(target, channel_credentials(ca)) as channel:
                err = await rpc_error(tokenizer_pb2_grpc.TokenizerServiceStub(channel).Encode(
                    encode("tls"), timeout=RPC_TIMEOUT))
                assert err.code() == grpc.StatusCode.UNAVAILABLE
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
                assert await health_of(probe) == SERVING
                assert await health_of(probe, TOKENIZER.full_name) == SERVING
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
