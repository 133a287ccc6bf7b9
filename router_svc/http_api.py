"""An OpenAI-compatible HTTP API over the router's engine (aiohttp, on the engine's event loop).

    POST /v1/completions, /v1/chat/completions   JSON, or SSE with "stream": true
    GET  /v1/models   /health (liveness)   /ready (every shard serving)   /metrics (Prometheus)

A thin adapter like the gRPC servicer: parse the JSON body into a `GenerateRequest` (the same
`validate` judges it in `Engine.submit`), then stream the engine's chunks as OpenAI's objects.
Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: InvalidArgument 400,
NotFound 404 (an unknown model: param "model", code "model_not_found"), ResourceExhausted 429,
Unavailable 503, anything else 500. The model's name is the router's served name. A client that
disconnects cancels its handler (`handler_cancellation`), and the `finally` cancels the request.
Extensions beyond OpenAI's fields, as in vLLM: top_k, ignore_eos, stop_token_ids.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from router_svc.engine import Engine
from router_svc.metrics import CONTENT_TYPE, RouterMetrics
from router_svc.request import GenerateRequest
from router_svc.sequence import Chunk, PositionLogprobs
from services.errors import CpumeshError, InvalidArgument, NotFound, ResourceExhausted, Unavailable

log = logging.getLogger("cpumesh.router.http")
STATUS: list[tuple[type[CpumeshError], int, str]] = [
    (InvalidArgument, 400, "invalid_request_error"), (NotFound, 404, "invalid_request_error"),
    (ResourceExhausted, 429, "rate_limit_error"), (Unavailable, 503, "service_unavailable")]
# The proto field names in `validate`'s messages, as OpenAI's parameter names.
PARAMS = {"sampling.max_new_tokens": "max_tokens", "sampling.temperature": "temperature",
          "sampling.top_k": "top_k", "sampling.top_p": "top_p", "sampling.seed": "seed",
          "sampling.stop": "stop", "sampling.stop_token_ids": "stop_token_ids",
          "sampling.top_logprobs": "top_logprobs", "chat": "messages", "prompt": "prompt",
          "request_id": "request_id", "input": "messages", "model": "model"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


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


# -- parsing ------------------------------------------------------------------------------------

def _get(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise InvalidArgument(f"{name} has the wrong type ({type(value).__name__})")
    return value


def _sampling(body: dict[str, Any], max_tokens: int | None, logprobs: int | None
              ) -> dict[str, Any]:
    """The fields both endpoints share, as GenerateRequest keyword arguments."""
    if _get(body, "n", (int,), 1) != 1 or _get(body, "best_of", (int,), 1) != 1:
        raise InvalidArgument("n: only n = 1 is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), 0) != 0:
            raise InvalidArgument(f"{name}: penalties are not supported")
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise InvalidArgument("stop must be a string or a list of strings")
    stop_ids = _get(body, "stop_token_ids", (list,), [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise InvalidArgument("stop_token_ids must be a list of integers")
    temperature = _get(body, "temperature", (int, float))
    top_p = _get(body, "top_p", (int, float))
    return dict(max_new_tokens=max_tokens, stop=tuple(stop), stop_token_ids=tuple(stop_ids),
                temperature=None if temperature is None else float(temperature),
                top_p=None if top_p is None else float(top_p),
                top_k=max(0, _get(body, "top_k", (int,), 0)), seed=_get(body, "seed", (int,)),
                ignore_eos=_get(body, "ignore_eos", (bool,), False),
                logprobs=logprobs is not None, top_logprobs=logprobs or 0)


def completion_request(body: dict[str, Any]) -> GenerateRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidArgument("prompt must be one string (batches and token ids are not "
                              "supported)")
    if _get(body, "echo", (bool,), False) or _get(body, "suffix", (str,)):
        raise InvalidArgument("echo: echo and suffix are not supported")
    max_tokens = _get(body, "max_tokens", (int,), COMPLETIONS_DEFAULT_MAX_TOKENS)
    return GenerateRequest(prompt=prompt, **_sampling(body, max_tokens,
                                                      _get(body, "logprobs", (int,))))


def chat_request(body: dict[str, Any]) -> GenerateRequest:
    messages = _get(body, "messages", (list,), [])
    pairs = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise InvalidArgument(f"messages[{i}].content: only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str) or not isinstance(m.get("role"), str):
            raise InvalidArgument(f"messages[{i}] must have a string role and content")
        pairs.append((m["role"], content))
    max_tokens = _get(body, "max_completion_tokens", (int,), _get(body, "max_tokens", (int,)))
    top = _get(body, "top_logprobs", (int,), 0)
    logprobs = top if _get(body, "logprobs", (bool,), False) else None
    return GenerateRequest(messages=tuple(pairs), **_sampling(body, max_tokens, logprobs))


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
        self.app = web.Application()
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models), web.get("/health", self.health),
            web.get("/ready", self.ready), web.get("/metrics", self.prometheus)])

    async def start(self, host: str, port: int, drain_grace_s: float = 10.0
                    ) -> tuple[web.AppRunner, int]:
        """Listen on host:port (0: any free port); return the runner and port. The runner's
        `cleanup` stops listening, lets requests in flight finish for up to `drain_grace_s`,
        then cancels what is left."""
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=drain_grace_s)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        return runner, int(runner.addresses[0][1])

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

    async def _serve(self, request: web.Request, parse: Callable[[dict[str, Any]], GenerateRequest],
                     kind: str, prefix: str) -> web.StreamResponse:
        try:
            try:
                body = await request.json()
            except ValueError as e:
                raise InvalidArgument(f"the body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise InvalidArgument("the body must be a JSON object")
            name = self.model_name()
            if body.get("model") not in (None, name):
                raise NotFound(f"model: the model {body.get('model')!r} does not exist; this "
                               f"router serves {name!r} (--served-model-name)")
            stream = await self.engine.submit(parse(body))
        except Exception as e:
            return error_response(e)
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
        finally:
            stream.close()

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
