"""TokenizerService over gRPC: a thin adapter (parse → tokenizer call in a worker thread →
convert). Tokenizer calls run off the event loop, so health checks and cancellations never wait
behind a large batch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from services.errors import Unavailable
from services.pb.cpumesh.v1 import tokenizer_pb2 as pb
from tokenizer_svc.tokenizer import DetokenizeInput, EncodeInput, Tokenizer

T = TypeVar("T")


class TokenizerServicer:
    def __init__(self, tokenizer: Tokenizer | None = None, workers: int = 4) -> None:
        self._tokenizer = tokenizer  # None until loaded: calls get UNAVAILABLE
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="tokenizer")

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise Unavailable("the tokenizer is still loading")
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def Encode(self, request: pb.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        items = [_encode_input(item) for item in request.items]
        ids = await self._run(self.tokenizer.encode_batch, items)
        return pb.EncodeResponse(
            results=[pb.EncodeResult(token_ids=i, count=len(i)) for i in ids])

    async def Decode(self, request: pb.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        sequences = [list(item.token_ids) for item in request.items]
        texts = await self._run(self.tokenizer.decode_batch, sequences,
                                request.skip_special_tokens)
        return pb.DecodeResponse(texts=texts)

    async def DetokenizeBatch(self, request: pb.DetokenizeBatchRequest,
                              context: grpc.aio.ServicerContext) -> pb.DetokenizeBatchResponse:
        items = [DetokenizeInput(list(i.token_ids), i.prefix_offset, i.read_offset, i.flush)
                 for i in request.items]
        results = await self._run(self.tokenizer.detokenize_batch, items,
                                  request.skip_special_tokens)
        return pb.DetokenizeBatchResponse(results=[
            pb.DetokenizeResult(seq_id=item.seq_id, text=r.text, prefix_offset=r.prefix_offset,
                                read_offset=r.read_offset)
            for item, r in zip(request.items, results, strict=True)])

    async def Info(self, request: pb.TokenizerInfoRequest,
                   context: grpc.aio.ServicerContext) -> pb.TokenizerInfoResponse:
        info = self.tokenizer.info
        return pb.TokenizerInfoResponse(
            vocab_size=info.vocab_size, bos_token_id=info.bos_token_id,
            eos_token_ids=info.eos_token_ids, end_of_turn_token_ids=info.end_of_turn_token_ids,
            has_chat_template=info.has_chat_template, model_name=info.model_name)


def _encode_input(item: pb.EncodeItem) -> EncodeInput:
    kind = item.WhichOneof("input")
    special = item.add_special_tokens if item.HasField("add_special_tokens") else None
    generation = item.add_generation_prompt if item.HasField("add_generation_prompt") else True
    if kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in item.chat.messages]
        return EncodeInput(messages=messages, add_generation_prompt=generation,
                           add_special_tokens=special)
    return EncodeInput(text=item.text if kind == "text" else None, add_special_tokens=special)
