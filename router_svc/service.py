"""One router process: connect to the tokenizer and the shards, serve RouterService until SIGTERM.

Health ("" and the RouterService name) is NOT_SERVING until the tokenizer and every shard answer
and agree, and again while the shard group is not whole after a failed step; "liveness" is
SERVING while the process is alive.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging

import grpc

from router_svc.config import RouterConfig
from router_svc.engine import Engine
from router_svc.servicer import RouterServicer
from router_svc.shards import ShardGroup
from router_svc.tokenizer_client import TokenizerClient
from services.auth import AuthInterceptor, TokenCheck
from services.pb.cpumesh.v1 import router_pb2
from services.server import bind, create_server
from services.transport import (
    channel_credentials,
    channel_options,
    server_credentials,
    server_options,
)

log = logging.getLogger("cpumesh.router")
LIVENESS = "liveness"
STATS_INTERVAL_S = 60.0


class RouterProcess:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config

    def _credentials(self) -> tuple[grpc.ServerCredentials | None,
                                    grpc.ChannelCredentials | None]:
        cfg = self.config
        if cfg.tls_cert is None or cfg.tls_key is None:
            return None, None
        server = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
        # With a CA (mutual TLS), the router presents its own certificate to the other services.
        client = channel_credentials(cfg.tls_ca, cfg.tls_cert, cfg.tls_key) \
            if cfg.tls_ca is not None else None
        return server, client

    async def serve(self) -> int:
        cfg = self.config
        server_creds, client_creds = self._credentials()
        shards = ShardGroup(cfg.shards, client_creds, channel_options(), cfg.internal_token)
        tokenizer = TokenizerClient(cfg.tokenizer, client_creds, channel_options(),
                                    cfg.internal_token)
        engine = Engine(cfg, shards, tokenizer)
        service = bind(RouterServicer(engine, cfg.max_running),
                       router_pb2.DESCRIPTOR.services_by_name["RouterService"])
        # One message over max_request_bytes is refused by gRPC itself (RESOURCE_EXHAUSTED) from
        # its length prefix, before it is buffered whole.
        server, port = create_server(service, address=cfg.listen, credentials=server_creds,
                                     health_address=cfg.health_listen, options=server_options(
                                         max_message_bytes=cfg.max_request_bytes),
                                     auth=AuthInterceptor(TokenCheck(cfg.api_keys), "API key")
                                     if cfg.api_keys else None)
        engine.on_serving = server.set_serving
        await server.start(serving=False)
        await server.set_serving(True, LIVENESS)
        log.info("router on port %d: tokenizer %s, shards %s", port, cfg.tokenizer,
                 ", ".join(cfg.shards))
        http = None
        if cfg.http_listen is not None:  # on this event loop, over the same engine
            from router_svc.http_api import HttpApi
            from router_svc.http_server import server_ssl_context
            from router_svc.metrics import RouterMetrics

            # HTTPS (mutual TLS, like gRPC) whenever the router has TLS: config requires the CA.
            tls = server_ssl_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) \
                if cfg.tls_cert and cfg.tls_key and cfg.tls_ca else None
            host, _, http_port = cfg.http_listen.rpartition(":")
            http, bound = await HttpApi(engine, RouterMetrics(engine)).start(
                host, int(http_port), cfg.drain_grace_s, tls)
            log.info("router HTTP API (OpenAI-compatible, /metrics) on %s://%s:%d",
                     "https" if tls else "http", host, bound)
        # Every module and object made so far lives as long as the process: out of the
        # collector's sight, a full collection no longer walks them (it took 13-16 ms here, in
        # the middle of a burst, and every refusal behind it waited).
        gc.freeze()
        run = asyncio.ensure_future(engine.run())
        stats = asyncio.ensure_future(_log_stats(engine))
        # On SIGTERM the HTTP API drains alongside gRPC (no new connections, streams in flight
        # finish within the grace) while the engine still runs.
        serving = asyncio.ensure_future(server.serve_until_signal(
            cfg.drain_grace_s, drain_also=http.cleanup if http is not None else None))
        status = 0
        try:
            await asyncio.wait({serving, run}, return_when=asyncio.FIRST_COMPLETED)
            if run.done():  # the engine never stops by itself: exit, so a supervisor restarts us
                log.critical("the engine stopped: %r", run.exception(),
                             exc_info=run.exception())
                await server.stop(0)
                status = 1
        finally:
            for task in (serving, stats, run):
                task.cancel()
            await asyncio.gather(serving, stats, run, return_exceptions=True)
            if http is not None and http.server is not None:  # not drained by a signal
                await http.cleanup()
            await shards.close()
            await tokenizer.close()
        log.info("engine stats: %s", engine.stats.summary())
        log.info("engine stats json: %s", json.dumps(engine.stats.as_dict()))
        log.info("router stopped")
        return status


async def _log_stats(engine: Engine) -> None:
    last = -1
    while True:
        await asyncio.sleep(STATS_INTERVAL_S)
        if engine.stats.steps != last:
            last = engine.stats.steps
            log.info("engine stats: %s", engine.stats.summary())
