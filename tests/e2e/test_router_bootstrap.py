"""Routers started on their own, over real processes on loopback: a router without shards is
alive but not ready and stops on SIGTERM; mTLS between all services, the router's HTTP API
then HTTPS (with client certificates too), started through the `cpumesh` console script.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2

from tests.certs import make_certs
from tests.e2e.router_cluster import PROMPT, SERVING
from tests.procs import Service, free_ports, health_status, wait_serving
from tools.client import RouterClient

pytestmark = pytest.mark.asyncio


async def test_router_without_shards_is_alive_not_ready_and_stops_on_sigterm(
        tmp_path: Path) -> None:
    tokenizer_port, shard_port, router_port = free_ports(3)
    address = f"127.0.0.1:{router_port}"
    router = Service("router", ["-m", "router_svc", "--tokenizer", f"127.0.0.1:{tokenizer_port}",
                                "--shards", f"127.0.0.1:{shard_port}", "--listen", address],
                     tmp_path).start()
    try:
        async with asyncio.timeout(30):
            while health_status(address, "liveness") != SERVING:
                await asyncio.sleep(0.1)
        assert health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        async with RouterClient(address) as client:
            for call in (client.complete(PROMPT, timeout=10), client.model_info()):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert f"127.0.0.1:{shard_port}" in (e.value.details() or "")
        router.signal(signal.SIGTERM)
        assert router.proc is not None and router.proc.wait(15) == 0
    finally:
        router.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_mutual_tls_between_all_services(smollm2_dir: Path, tmp_path: Path) -> None:

    make_certs(tmp_path)
    tls = ["--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"),
           "--tls-ca", str(tmp_path / "ca.pem")]
    ports = free_ports(8)
    tok, shard, router, mesh, http, *health = (f"127.0.0.1:{p}" for p in ports)
    cpumesh = str(Path(sys.executable).parent / "cpumesh")
    services = [
        Service("tokenizer", ["-m", "tokenizer_svc", "--model-dir", str(smollm2_dir), "--listen",
                              tok, "--health-listen", health[0], *tls], tmp_path),
        Service("shard0", ["-m", "shard_svc", "--model-dir", str(smollm2_dir), "--peers", mesh,
                           "--listen", shard, "--threads", "1", "--kv-capacity-tokens", "512",
                           "--health-listen", health[1], *tls], tmp_path),
        Service("router", [cpumesh, "router", "--tokenizer", tok, "--shards", shard,
                           "--listen", router, "--health-listen", health[2],
                           "--http-listen", http, *tls], tmp_path)]
    try:
        for s in services:
            s.start()
        wait_serving(health[2], services[2], deadline_s=120)
        mine = grpc.ssl_channel_credentials(
            (tmp_path / "ca.pem").read_bytes(), (tmp_path / "client.key").read_bytes(),
            (tmp_path / "client.pem").read_bytes())
        async with RouterClient(router, mine) as client:
            done = await client.complete(PROMPT, max_new_tokens=4, temperature=0, timeout=60)
            assert len(done.token_ids) == 4
        no_cert = grpc.ssl_channel_credentials((tmp_path / "ca.pem").read_bytes())
        async with RouterClient(router, no_cert) as client:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.complete(PROMPT, max_new_tokens=4, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.to_thread(check_https, http, tmp_path)
    finally:
        for s in reversed(services):
            s.stop()


def check_https(http: str, certs: Path) -> None:
    """The HTTP API of a router with TLS: the `openai` client trusting the test CA and showing
    a client certificate gets a chat completion over https; without a certificate the TLS
    handshake fails, and plain http gets no answer."""
    context = ssl.create_default_context(cafile=certs / "ca.pem")
    context.load_cert_chain(certs / "client.pem", certs / "client.key")
    with openai.DefaultHttpxClient(verify=context, timeout=60) as session:
        api = openai.OpenAI(base_url=f"https://{http}/v1", api_key="-", max_retries=0,
                            http_client=session)
        done = api.chat.completions.create(
            model="SmolLM2-135M-Instruct", max_tokens=4, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert done.usage is not None and done.usage.completion_tokens == 4
        assert done.choices[0].message.content
    no_cert = ssl.create_default_context(cafile=certs / "ca.pem")
    with openai.DefaultHttpxClient(verify=no_cert, timeout=10) as session:
        api = openai.OpenAI(base_url=f"https://{http}/v1", api_key="-", max_retries=0,
                            http_client=session)
        with pytest.raises(openai.APIConnectionError):
            api.models.list()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{http}/health", timeout=10)
