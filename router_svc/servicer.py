"""RouterService over gRPC: a thin adapter (parse → engine → convert).

A client that cancels, disconnects or runs past its deadline gets `asyncio.CancelledError` at
the next `await`/`yield` here; the `finally` cancels its request in the engine, which releases
the sequence on every shard before the next step.

Generate takes the request's bytes (`raw_requests`), so bounds come before any work: a full
waiting queue refuses it at once (RESOURCE_EXHAUSTED, unparsed), then a ticket of the engine's
`Admission` (requests and bytes in flight, RESOURCE_EXHAUSTED), then the bytes' size against
what a prompt or chat within the limits can make (INVALID_ARGUMENT, unparsed), then the chat's
message count as soon as it is parsed (before its messages are copied). A large request is
parsed in a thread, off the event loop that streams everyone's tokens. A refusal by the first two
is timed from the handler's start until its status is sent (`EngineStats.refused`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from router_svc.admission import refuse_if_queue_full
from router_svc.engine import Engine
from router_svc.request import GenerateRequest, Limits, check_chat_messages, max_request_size
from router_svc.sequence import Chunk, TokenLogprob
from router_svc.stops import FinishReason
from services.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.pb.cpumesh.v1 import common_pb2, router_pb2
from services.server import parse

PARSE_IN_THREAD_BYTES = 256 * 1024  # requests larger than this are parsed off the event loop

FINISH_REASONS = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


class RouterServicer:
    raw_requests = frozenset({"Generate"})  # services.server.bind hands it the request bytes

    def __init__(self, engine: Engine, max_batch_size: int) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size

    async def Generate(self, data: bytes, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[router_pb2.GenerateResponse]:
        started = time.perf_counter()
        try:
            refuse_if_queue_full(self.engine.scheduler)  # before anything is parsed or created
            ticket = self.engine.admission.enter(len(data))
        except ResourceExhausted:
            stats = self.engine.stats  # timed until its status is sent (cpumesh_refusal_seconds)
            context.add_done_callback(
                lambda _: stats.refused("grpc", time.perf_counter() - started))
            raise
        try:
            stream = await self.engine.submit(await self._parse(data))
            try:
                async for chunk in stream:
                    yield to_pb(stream.request_id, chunk)
                    if chunk.error is not None:
                        raise chunk.error  # after the chunk with finish ERROR: the call's status
            finally:
                stream.close()
        finally:
            ticket.release()

    async def _parse(self, data: bytes) -> GenerateRequest:
        model = self.engine.model
        if model is None:
            raise Unavailable(f"the router is not serving: {self.engine.not_serving_reason}")
        limits = model.limits(self.engine.config)
        if len(data) > max_request_size(limits):
            raise InvalidArgument(
                f"input: the request is {len(data)} bytes, more than any prompt or chat within "
                f"the limits can make ({limits.max_prompt_bytes} UTF-8 bytes, --max-prompt-bytes; "
                f"{limits.max_chat_messages} messages, --max-chat-messages)")
        if len(data) > PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(request_from_bytes, data, limits)
        return request_from_bytes(data, limits)

    async def ModelInfo(self, request: router_pb2.ModelInfoRequest,
                        context: grpc.aio.ServicerContext) -> router_pb2.ModelInfoResponse:
        model = self.engine.model
        if model is None:
            raise Unavailable(f"the router is not serving: {self.engine.not_serving_reason}")
        g, t = model.group, model.tokenizer
        response = router_pb2.ModelInfoResponse(
            model_name=model.served_name(self.engine.config), model_fingerprint=g.model_fingerprint,
            context_length=model.context_length, vocab_size=g.vocab_size, tp_size=g.tp_size,
            dtype=g.dtype, has_chat_template=t.has_chat_template,
            eos_token_ids=model.eos_token_ids, kv_capacity_tokens=g.kv_capacity_tokens,
            max_batch_size=self.max_batch_size)
        if t.bos_token_id is not None:
            response.bos_token_id = t.bos_token_id
        return response


def request_from_bytes(data: bytes, limits: Limits) -> GenerateRequest:
    """Parse a GenerateRequest; a chat's message count is bounded before its messages are
    copied. (Run in a thread for large requests: it touches nothing shared.)"""
    r = parse(router_pb2.GenerateRequest, data)
    if r.WhichOneof("input") == "chat":
        check_chat_messages(len(r.chat.messages), limits)
    return from_pb(r)


def from_pb(r: router_pb2.GenerateRequest) -> GenerateRequest:
    """The request's fields, unset optional ones as None; `validate` judges them."""
    s = r.sampling
    which = r.WhichOneof("input")
    return GenerateRequest(
        prompt=r.prompt if which == "prompt" else None,
        messages=tuple((m.role, m.content) for m in r.chat.messages) if which == "chat" else None,
        max_new_tokens=s.max_new_tokens if s.HasField("max_new_tokens") else None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_k=s.top_k, top_p=s.top_p if s.HasField("top_p") else None,
        seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos, logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
        request_id=r.request_id if r.HasField("request_id") else None)


def _logprob(t: TokenLogprob) -> router_pb2.Logprob:
    return router_pb2.Logprob(token_id=t.token_id, text=t.text, logprob=t.logprob)


def to_pb(request_id: str, chunk: Chunk) -> router_pb2.GenerateResponse:
    response = router_pb2.GenerateResponse(
        request_id=request_id, text=chunk.text, token_ids=chunk.token_ids,
        logprobs=[router_pb2.TokenLogprobs(token=_logprob(p.token),
                                           top=[_logprob(t) for t in p.top])
                  for p in chunk.logprobs])
    if chunk.finish is not None:
        response.finish_reason = FINISH_REASONS[chunk.finish.reason]
        response.finish_detail = chunk.finish.detail
    if chunk.stop_string is not None:
        response.stop_string = chunk.stop_string
    elif chunk.stop_token_id is not None:
        response.stop_token_id = chunk.stop_token_id
    if chunk.usage is not None:
        u = chunk.usage
        response.usage.CopyFrom(common_pb2.Usage(
            prompt_tokens=u.prompt_tokens, generated_tokens=u.generated_tokens,
            time_to_first_token_s=u.time_to_first_token_s, total_s=u.total_s))
    return response
