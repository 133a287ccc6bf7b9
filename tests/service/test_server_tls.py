"""The server bootstrap with mTLS: clients without a certificate are refused, while the
separate health port stays plaintext.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from services.pb.cpumesh.v1 import tokenizer_pb2_grpc
from services.server import bind
from services.transport import channel_credentials, server_credentials
from tests.certs import make_certs
from tests.service.tiny_server import (
    RPC_TIMEOUT,
    SERVING,
    TOKENIZER,
    TinyTokenizer,
    encode,
    health_of,
    rpc_error,
    run,
    serving,
)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mtls_refuses_clients_without_a_certificate_and_health_stays_plaintext(
        tmp_path: Path) -> None:
    make_certs(tmp_path)
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
