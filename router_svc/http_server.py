"""How the router's HTTP API is served: listening, HTTPS, and the API-key check.

With the router's TLS options (`--tls-cert`, `--tls-key`, `--tls-ca`) the HTTP API is HTTPS
with the same certificate as gRPC and, like gRPC, mutual TLS: a client must present a
certificate signed by the CA, so HTTP is no way around gRPC's mutual TLS. Plain HTTP to that
port fails its TLS handshake. Without them it is plain HTTP.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

from services.auth import TokenCheck

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def server_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """HTTPS with this certificate and key, requiring client certificates signed by `ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def api_key_middleware(keys: TokenCheck) -> Middleware:
    """/v1/* needs "Authorization: Bearer <key>" with one of `keys` (401 otherwise, before the
    body is read); /health, /ready and /metrics stay open."""
    message = ("Incorrect API key provided: send 'Authorization: Bearer <key>' with one of the "
               "router's API keys (--api-keys-file)")
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": "invalid_api_key"}}

    @web.middleware
    async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/") and not keys.accepts(
                request.headers.get("Authorization")):
            return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)
    return authorize


async def start_http(app: web.Application, host: str, port: int, drain_grace_s: float = 10.0,
                     ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0: any free port; HTTPS with `ssl_context`); return the runner
    and port. The runner's `cleanup` stops listening, lets requests in flight finish for up to
    `drain_grace_s`, then cancels what is left. A client that disconnects cancels its handler."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=drain_grace_s)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])
