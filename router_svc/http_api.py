"""An OpenAI-compatible HTTP API over the router's engine (aiohttp, on the engine's event loop).

    POST /v1/completions, /v1/chat/completions   JSON, or SSE with "stream": true
    GET  /v1/models   /health (liveness)   /ready (every shard serving)   /metrics (Prometheus)

A thin adapter like the gRPC servicer: parse the JSON body into a `GenerateRequest` (the same
`validate` judges it in `Engine.submit`), then stream the engine's chunks as OpenAI's objects.
Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: InvalidArgument 400,
NotFound 404 (an unknown model: param "model", code "model_not_found"), ResourceExhausted 429,
Unavailable 503, anything else 500. The model's name is the router's served name. A client that
disconnects cancels its handler (`handler_cancellation`), and the `finally` cancels the request.
Extensions beyond OpenAI's fields, as in vLLM: top_k, ignore_eos, stop_token_ids. Listening,
HTTPS and the API-key check are in `http_server.py`.

Bounds before work, as over gRPC: a full waiting queue is 429 before the body is read; each
request takes a ticket of the engine's `Admission` when it arrives (429 past the requests or
bytes in flight); a body larger than `--max-request-bytes`, or than any valid request within the
model's limits can be in JSON, is 413 without being read; a chat's message count is checked
before its messages are copied; large bodies are decoded in a thread. A 429 before any work is
timed from the handler's start until its response is handed to aiohttp (`EngineStats.refused`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from router_svc.admission import Ticket, refuse_if_queue_full
from router_svc.engine import Engine
from router_svc.http_server import api_key_middleware, start_http
from router_svc.metrics import CONTENT_TYPE, RouterMetrics
from router_svc.openai_request import chat_request, completion_request, decode, max_body_bytes
from router_svc.request import GenerateRequest, Limits
from router_svc.sequence import Chunk, PositionLogprobs
from router_svc.stream import Stream
from services.auth import TokenCheck
from services.errors import CpumeshError, InvalidArgument, NotFound, ResourceExhausted, Unavailable

log = logging.getLogger("cpumesh.router.http")
PARSE_IN_THREAD_BYTES = 256 * 1024  # bodies larger than this are decoded off the event loop


class PayloadTooLarge(InvalidArgument):
    """A body over the limit, refused before it is read: HTTP 413 (never raised over gRPC)."""


STATUS: list[tuple[type[CpumeshError], int, str]] = [
    (PayloadTooLarge, 413, "invalid_request_error"),
    (InvalidArgument, 400, "invalid_request_error"), (NotFound, 404, "invalid_request_error"),
    (ResourceExhausted, 429, "rate_limit_error"), (Unavailable, 503, "service_unavailable")]
# The proto field names in `validate`'s messages, as OpenAI's parameter names.
PARAMS = {"sampling.max_new_tokens": "max_tokens", "sampling.temperature": "temperature",
          "sampling.top_k": "top_k", "sampling.top_p": "top_p", "sampling.seed": "seed",
          "sampling.stop": "stop", "sampling.stop_token_ids": "stop_token_ids",
          "sampling.top_logprobs": "top_logprobs", "chat": "messages", "prompt": "prompt",
          "chat.messages": "messages",
          "request_id": "request_id", "input": "messages", "model": "model"}


def classify(e: BaseException) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of `e` (500, internal_error: anything unforeseen)."""
    return next(((code, name) for cls, code, name in STATUS if isinstance(e, cls)),
                (500, "internal_error"))


def error_response(e: Exception) -> web.Response:
    status, kind = classify(e)
    if status == 500:
        log.exception("HTTP request failed", exc_info=e)
    message = str(e) if isinstance(e, CpumeshError) else f"{type(e).__name__}: {e}"
    return web.json_response({"error": error_body(message, kind, status)}, status=status)


def error_body(message: str, kind: str, status: int) -> dict[str, Any]:
    """OpenAI's error object: `param` from the message's first word, `code` the HTTP status but
    for an unknown model (OpenAI's "model_not_found")."""
    head = message.split(" ", 1)[0].split("[", 1)[0].rstrip(":")
    param = PARAMS.get(head)
    code = "model_not_found" if (status, param) == (404, "model") else status
    return {"message": message, "type": kind, "param": param, "code": code}


# -- responses ----------------------------------------------------------------------------------

def _chat_logprobs(ps: tuple[PositionLogprobs, ...]) -> dict[str, Any]:
    def one(t: Any) -> dict[str, Any]:
        return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}
    return {"content": [{**one(p.token), "top_logprobs": [one(t) for t in p.top]} for p in ps]}


def _text_logprobs(ps: tuple[PositionLogprobs, ...]) -> dict[str, Any]:
    return {"tokens": [p.token.text for p in ps],
            "token_logprobs": [p.token.logprob for p in ps],
            "top_logprobs": [{t.text: t.logprob for t in p.top} for p in ps]}


def _usage(chunk: Chunk) -> dict[str, int] | None:
    u = chunk.usage
    if u is None:
        return None
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.generated_tokens,
            "total_tokens": u.prompt_tokens + u.generated_tokens}


class HttpApi:
    def __init__(self, engine: Engine, metrics: RouterMetrics) -> None:
        self.engine, self.metrics = engine, metrics
        keys = engine.config.api_keys
        self.app = web.Application(client_max_size=engine.config.max_request_bytes,
                                   middlewares=[api_key_middleware(TokenCheck(keys))]
                                   if keys else [])
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models), web.get("/health", self.health),
            web.get("/ready", self.ready), web.get("/metrics", self.prometheus)])

    async def start(self, host: str, port: int, drain_grace_s: float = 10.0,
                    ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
        """Listen on host:port (HTTPS with `ssl_context`); see `http_server.start_http`."""
        return await start_http(self.app, host, port, drain_grace_s, ssl_context)

    def model_name(self) -> str:
        model = self.engine.model
        if model is None:
            raise Unavailable(f"the router is not serving: {self.engine.not_serving_reason}")
        return model.served_name(self.engine.config)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def ready(self, request: web.Request) -> web.Response:
        if not self.engine.serving:
            return error_response(Unavailable(
                f"the router is not serving: {self.engine.not_serving_reason}"))
        return web.json_response({"status": "ready"})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE})

    async def models(self, request: web.Request) -> web.Response:
        try:
            data = [{"id": self.model_name(), "object": "model", "created": 0,
                     "owned_by": "cpumesh"}]
        except Unavailable as e:
            return error_response(e)
        return web.json_response({"object": "list", "data": data})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, completion_request, "text_completion", "cmpl")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat_request, "chat.completion", "chatcmpl")

    async def _serve(self, request: web.Request,
                     parse: Callable[[dict[str, Any], Limits], GenerateRequest],
                     kind: str, prefix: str) -> web.StreamResponse:
        ticket: Ticket | None = None
        stream: Stream | None = None
        started = time.perf_counter()
        try:
            ticket, body, generate = await self._read(request, parse)
            name = self.model_name()
            stream = await self.engine.submit(generate)
            return await self._respond(request, stream, body, name, kind, prefix)
        except Exception as e:
            response = error_response(e)
            if ticket is None and isinstance(e, ResourceExhausted):  # refused before any work
                self.engine.stats.refused("http", time.perf_counter() - started)
            return response
        finally:  # however it ends, a client's disconnect included
            if stream is not None:
                stream.close()
            if ticket is not None:
                ticket.release()

    async def _read(self, request: web.Request,
                    parse: Callable[[dict[str, Any], Limits], GenerateRequest]
                    ) -> tuple[Ticket, dict[str, Any], GenerateRequest]:
        """A ticket, the body (bounded before it is read) and its request (decoded in a thread
        when big). The ticket is the caller's to release once this returns."""
        name = self.model_name()
        model = self.engine.model
        assert model is not None  # model_name raised otherwise
        limits = model.limits(self.engine.config)
        limit = max_body_bytes(limits, self.engine.config.max_request_bytes)
        too_large = PayloadTooLarge(
            f"the body is over the limit of {limit} bytes (--max-request-bytes "
            f"{self.engine.config.max_request_bytes}, or the most a request within "
            f"--max-prompt-bytes {limits.max_prompt_bytes} and --max-chat-messages "
            f"{limits.max_chat_messages} can take in JSON)")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        refuse_if_queue_full(self.engine.scheduler)  # 429 before the body is read
        ticket = self.engine.admission.enter(request.content_length or 0)
        try:
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:  # a chunked body past client_max_size
                raise too_large from None
            if len(raw) > limit:
                raise too_large
            if request.content_length is None:
                ticket.grow(len(raw))
            big = len(raw) > PARSE_IN_THREAD_BYTES
            body = await asyncio.to_thread(decode, raw) if big else decode(raw)
            if body.get("model") not in (None, name):
                raise NotFound(f"model: the model {body.get('model')!r} does not exist; this "
                               f"router serves {name!r} (--served-model-name)")
            generate = await asyncio.to_thread(parse, body, limits) if big \
                else parse(body, limits)
        except BaseException:
            ticket.release()
            raise
        return ticket, body, generate

    async def _respond(self, request: web.Request, stream: Stream, body: dict[str, Any],
                       name: str, kind: str, prefix: str) -> web.StreamResponse:
        try:
            head = {"id": f"{prefix}-{stream.request_id}", "object": kind,
                    "created": int(time.time()), "model": name}
            chat = kind == "chat.completion"
            if body.get("stream") is True:
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                return await self._sse(request, stream, head, chat, include_usage)
            text: list[str] = []
            logprobs: list[PositionLogprobs] = []
            finish, usage = None, None
            async for chunk in stream:
                if chunk.error is not None:
                    raise chunk.error
                text.append(chunk.text)
                logprobs.extend(chunk.logprobs)
                finish, usage = chunk.finish, _usage(chunk)
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish and finish.reason.value}
            lps = tuple(logprobs) if body.get("logprobs") else None
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(text)}
                choice["logprobs"] = _chat_logprobs(lps) if lps is not None else None
            else:
                choice["text"] = "".join(text)
                choice["logprobs"] = _text_logprobs(lps) if lps is not None else None
            return web.json_response({**head, "choices": [choice], "usage": usage})
        except Exception as e:
            return error_response(e)

    async def _sse(self, request: web.Request, chunks: AsyncIterator[Chunk], head: dict[str, Any],
                   chat: bool, include_usage: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        async def send(obj: dict[str, Any] | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await response.write(f"data: {data}\n\n".encode())

        first, usage = True, None
        async for chunk in chunks:
            if chunk.error is not None:
                status, kind = classify(chunk.error)
                await send({"error": error_body(str(chunk.error), kind, status)})
                break
            choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                      "finish_reason": chunk.finish and chunk.finish.reason.value}
            if chat:
                choice["delta"] = {"role": "assistant", "content": chunk.text} if first \
                    else {"content": chunk.text}
                if chunk.logprobs:
                    choice["logprobs"] = _chat_logprobs(chunk.logprobs)
            else:
                choice["text"] = chunk.text
                if chunk.logprobs:
                    choice["logprobs"] = _text_logprobs(chunk.logprobs)
            first, usage = False, _usage(chunk)
            await send({**head, "choices": [choice]})
        if include_usage and usage is not None:
            await send({**head, "choices": [], "usage": usage})
        await send("[DONE]")
        await response.write_eof()
        return response
