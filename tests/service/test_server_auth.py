"""Bearer tokens (services/auth.py) with the real server bootstrap on port 0: token files are read
strictly; `create_server(auth=...)` refuses unary and streaming calls without an accepted token
with UNAUTHENTICATED before the servicer runs, leaves health open; `open_channel(token=...)`
sends the token on every call."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from services.auth import AuthInterceptor, TokenCheck, internal_auth, read_token, read_tokens
from services.pb.cpumesh.v1 import router_pb2, router_pb2_grpc, tokenizer_pb2_grpc
from services.server import bind
from services.transport import channel_options, open_channel
from tests.service.tiny_server import (
    ROUTER,
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


def test_token_files_are_read_strictly(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# keys\n\n  alpha-1  \nbeta/2+=\n")
    assert read_tokens(f) == ("alpha-1", "beta/2+=")
    with pytest.raises(ValueError, match="must hold one token, it holds 2"):
        read_token(f)
    for text, message in (("", "holds no token"), ("# only a comment\n", "holds no token"),
                          ("good\nwith space\n", "line 2: a token must be printable ASCII"),
                          ("caf\u00e9\n", "line 1: a token must be printable ASCII")):
        f.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_tokens(f)
    with pytest.raises(ValueError, match=f"cannot read the internal token file {tmp_path}/no"):
        read_token(tmp_path / "no")


def test_token_check_accepts_exactly_the_tokens_after_bearer() -> None:
    check = TokenCheck(["alpha", "beta-2"])
    for value in ("Bearer alpha", "bearer beta-2", "BEARER  alpha ", "Bearer beta-2"):
        assert check.accepts(value), value
    for value in (None, "", "alpha", "Bearer", "Bearer ", "Basic alpha", "Bearer alph",
                  "Bearer alphaa", "Bearer beta", "Bearer alpha beta-2", "Bearer ALPHA"):
        assert not check.accepts(value), value
    with pytest.raises(ValueError):
        TokenCheck([])


def test_calls_without_the_token_are_refused_before_the_servicer_and_health_stays_open() -> None:
    class Counting(TinyTokenizer):
        calls = 0

        async def Encode(self, request, context):  # type: ignore[no-untyped-def]
            Counting.calls += 1
            return await super().Encode(request, context)

    async def body() -> None:
        auth = AuthInterceptor(TokenCheck(["k1", "k2"]), "API key")
        async with serving(bind(Counting(), TOKENIZER), bind(TinyRouter(), ROUTER),
                           auth=auth) as (_, port):
            address = f"127.0.0.1:{port}"
            async with grpc.aio.insecure_channel(address) as plain:
                tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(plain)
                for metadata in ((), (("authorization", "Bearer k3"),),
                                 (("authorization", "k1"),)):
                    e = await rpc_error(tokenizer.Encode(encode("hi"), metadata=metadata,
                                                         timeout=5))
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "/cpumesh.v1.TokenizerService/Encode" in (e.details() or "")
                    assert "API key" in (e.details() or "")
                    stream = router_pb2_grpc.RouterServiceStub(plain).Generate(
                        router_pb2.GenerateRequest(prompt="abc"), metadata=metadata, timeout=5)
                    e = await rpc_error(collect(stream))
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                assert Counting.calls == 0
                assert await health_of(plain) == SERVING
                ok = await tokenizer.Encode(encode("hi"), timeout=5,
                                            metadata=(("authorization", "Bearer k2"),))
                assert list(ok.results[0].token_ids) == list(b"hi") and Counting.calls == 1
            # The client half: every unary and streaming call carries the token.
            async with open_channel(address, None, channel_options(), "k1") as channel:
                ok = await tokenizer_pb2_grpc.TokenizerServiceStub(channel).Encode(
                    encode("yo"), timeout=5)
                assert list(ok.results[0].token_ids) == list(b"yo")
                chunks = await collect(router_pb2_grpc.RouterServiceStub(channel).Generate(
                    router_pb2.GenerateRequest(prompt="abc"), timeout=5))
                assert "".join(c.text for c in chunks) == "abc"
            async with open_channel(address, None, channel_options(), "wrong") as channel:
                e = await rpc_error(tokenizer_pb2_grpc.TokenizerServiceStub(channel).Encode(
                    encode("yo"), timeout=5))
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED

    run(body())


def test_no_internal_token_means_no_interceptor() -> None:
    assert internal_auth(None) is None
    assert isinstance(internal_auth("t"), AuthInterceptor)
