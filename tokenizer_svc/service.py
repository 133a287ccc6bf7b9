"""One tokenizer process: bind the port, load the tokenizer, serve until SIGTERM.

Health ("" and the TokenizerService name) is NOT_SERVING while the tokenizer loads and while
draining; "liveness" is SERVING while the process is alive (a Kubernetes liveness probe).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from services.auth import internal_auth
from services.pb.cpumesh.v1 import tokenizer_pb2
from services.server import Server, bind, create_server
from services.transport import server_credentials
from tokenizer_svc.config import TokenizerConfig
from tokenizer_svc.servicer import TokenizerServicer
from tokenizer_svc.tokenizer import Tokenizer

log = logging.getLogger("cpumesh.tokenizer")
LIVENESS = "liveness"
SERVICE = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"]


def build_server(servicer: TokenizerServicer, *, address: str = "127.0.0.1:0",
                 credentials: grpc.ServerCredentials | None = None,
                 health_address: str | None = None,
                 reflection: bool = False,
                 internal_token: str | None = None) -> tuple[Server, int]:
    """The (not yet started) server of `servicer` and its port; call inside the event loop."""
    return create_server(bind(servicer, SERVICE), address=address, credentials=credentials,
                         health_address=health_address, reflection=reflection,
                         auth=internal_auth(internal_token))


def load(config: TokenizerConfig) -> Tokenizer:
    return Tokenizer.from_dir(config.model_dir, max_text_chars=config.max_text_chars,
                              chat_roles=config.chat_roles, model_name=config.model_name)


async def serve(config: TokenizerConfig) -> int:
    t0 = time.monotonic()
    credentials = (server_credentials(config.tls_cert, config.tls_key, config.tls_ca)
                   if config.tls_cert and config.tls_key else None)
    servicer = TokenizerServicer(workers=config.workers)
    server, port = build_server(servicer, address=config.listen, credentials=credentials,
                                health_address=config.health_listen,
                                reflection=config.reflection,
                                internal_token=config.internal_token)
    await server.start(serving=False)
    await server.set_serving(True, LIVENESS)
    try:
        servicer.tokenizer = await asyncio.get_running_loop().run_in_executor(
            servicer.executor, load, config)
    except BaseException:
        await server.stop(0)
        servicer.executor.shutdown(wait=False)
        raise
    info = servicer.tokenizer.info
    await server.set_serving(True)
    log.info("SERVING %s on port %d after %.1f s (vocabulary %d, chat template: %s)",
             info.model_name, port, time.monotonic() - t0, info.vocab_size,
             "yes" if info.has_chat_template else "no")
    try:
        await server.serve_until_signal(config.drain_grace_s)
    finally:
        servicer.executor.shutdown(wait=True)
    log.info("stopped")
    return 0
