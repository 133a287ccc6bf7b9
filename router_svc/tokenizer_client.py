"""Async client to the tokenizer service, in the router's own types.

The tokenizer refusing a prompt (too long, a role the chat template does not know) is the
client's fault: InvalidArgument naming the request field. Any other failure is Unavailable
naming the tokenizer's address.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router_svc.shards import RECONNECT_OPTIONS
from services.errors import InvalidArgument, Unavailable
from services.pb.cpumesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from services.transport import open_channel

MAX_CACHED_TEXTS = 1 << 16  # token texts kept for logprobs


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    end_of_turn_token_ids: tuple[int, ...]
    has_chat_template: bool
    model_name: str


@dataclass(frozen=True)
class DetokItem:
    seq_id: int
    token_ids: tuple[int, ...]  # a window of the sequence, ending with its newest token
    prefix_offset: int  # relative to the window
    read_offset: int  # relative to the window
    flush: bool = False


@dataclass(frozen=True)
class DetokResult:
    seq_id: int
    text: str
    prefix_offset: int  # relative to the item's window
    read_offset: int


class TokenizerClient:
    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = (), token: str | None = None) -> None:
        self.address = address
        opts = [*options, *RECONNECT_OPTIONS]
        self._channel = open_channel(address, credentials, opts, token)
        self._stub = tokenizer_pb2_grpc.TokenizerServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._texts: dict[int, str] = {}

    async def close(self) -> None:
        await self._channel.close()

    def _unavailable(self, what: str, e: grpc.aio.AioRpcError) -> Unavailable:
        return Unavailable(f"tokenizer {self.address} failed {what}: "
                           f"{e.code().name}: {e.details()}")

    async def info(self, timeout: float) -> TokenizerInfo:
        try:
            r = await self._stub.Info(tokenizer_pb2.TokenizerInfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise self._unavailable("Info", e) from None
        return TokenizerInfo(
            vocab_size=r.vocab_size,
            bos_token_id=r.bos_token_id if r.HasField("bos_token_id") else None,
            eos_token_ids=tuple(r.eos_token_ids),
            end_of_turn_token_ids=tuple(r.end_of_turn_token_ids),
            has_chat_template=r.has_chat_template, model_name=r.model_name)

    async def healthy(self, timeout: float) -> bool:
        try:
            r = await self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                         timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)

    async def encode(self, prompt: str | None, messages: Sequence[tuple[str, str]] | None,
                     timeout: float) -> list[int]:
        """The prompt's token ids (a chat with the template's assistant header)."""
        if messages is not None:
            item = tokenizer_pb2.EncodeItem(chat=common_pb2.ChatMessages(messages=[
                common_pb2.ChatMessage(role=role, content=content) for role, content in messages]))
        else:
            item = tokenizer_pb2.EncodeItem(text=prompt or "")
        try:
            r = await self._stub.Encode(tokenizer_pb2.EncodeRequest(items=[item]),
                                        timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                detail = (e.details() or "").removeprefix("item 0: ")
                raise InvalidArgument(f"{'chat' if messages is not None else 'prompt'}: "
                                      f"{detail}") from None
            raise self._unavailable("Encode", e) from None
        return list(r.results[0].token_ids)

    async def detokenize(self, items: Sequence[DetokItem], timeout: float,
                         skip_special_tokens: bool = True) -> list[DetokResult]:
        request = tokenizer_pb2.DetokenizeBatchRequest(
            skip_special_tokens=skip_special_tokens,
            items=[tokenizer_pb2.DetokenizeItem(
                seq_id=i.seq_id, token_ids=i.token_ids, prefix_offset=i.prefix_offset,
                read_offset=i.read_offset, flush=i.flush) for i in items])
        try:
            r = await self._stub.DetokenizeBatch(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise self._unavailable("DetokenizeBatch", e) from None
        if [x.seq_id for x in r.results] != [i.seq_id for i in items]:
            raise Unavailable(f"tokenizer {self.address} answered DetokenizeBatch out of order")
        return [DetokResult(x.seq_id, x.text, x.prefix_offset, x.read_offset) for x in r.results]

    async def token_texts(self, token_ids: Sequence[int], timeout: float) -> dict[int, str]:
        """Each token's text on its own (special tokens included), for logprobs; cached."""
        texts = {t: self._texts[t] for t in token_ids if t in self._texts}
        missing = sorted(set(token_ids) - texts.keys())
        if missing:
            request = tokenizer_pb2.DecodeRequest(
                items=[tokenizer_pb2.DecodeItem(token_ids=[t]) for t in missing])
            try:
                r = await self._stub.Decode(request, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                raise self._unavailable("Decode", e) from None
            fetched = dict(zip(missing, r.texts, strict=True))
            if len(self._texts) + len(fetched) > MAX_CACHED_TEXTS:
                self._texts.clear()
            self._texts.update(fetched)
            texts.update(fetched)
        return texts
