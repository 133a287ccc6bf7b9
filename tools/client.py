"""A small async client of the router, over the generated stubs.

    async with RouterClient("127.0.0.1:50051") as client:
        async for response in client.generate("Once upon a time", max_new_tokens=32):
            print(response.text, end="", flush=True)
        done = await client.complete(messages=[("user", "Hi!")], temperature=0)
        print(done.text, done.finish_reason, done.usage.time_to_first_token_s)

Errors arrive as `grpc.aio.AioRpcError` with the router's status code. `python -m
tools.client --router HOST:PORT PROMPT` streams one generation to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.pb.cpumesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.transport import channel_options, open_channel


@dataclass
class Completion:
    """A whole generation: the streamed responses joined, with client-side timings."""

    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[router_pb2.TokenLogprobs] = field(default_factory=list)
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    finish_detail: str = ""
    stop_string: str | None = None
    stop_token_id: int | None = None
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    chunks: int = 0
    arrivals_s: list[float] = field(default_factory=list)  # since the call, per response

    def add(self, r: router_pb2.GenerateResponse) -> None:
        """Join one streamed response (the last one carries the finish reason and usage)."""
        self.chunks += 1
        self.request_id = r.request_id
        self.text += r.text
        self.token_ids.extend(r.token_ids)
        self.logprobs.extend(r.logprobs)
        if r.finish_reason:
            self.finish_reason, self.finish_detail = r.finish_reason, r.finish_detail
            self.usage.CopyFrom(r.usage)
            which = r.WhichOneof("matched_stop")
            self.stop_string = r.stop_string if which == "stop_string" else None
            self.stop_token_id = r.stop_token_id if which == "stop_token_id" else None

    @property
    def finish_name(self) -> str:
        """"stop", "length", "cancelled", "error" (or "unspecified")."""
        name = common_pb2.FinishReason.Name(self.finish_reason)  # type: ignore[arg-type]
        return name.removeprefix("FINISH_REASON_").lower()


def generate_request(prompt: str | None = None, *,
                     messages: Sequence[tuple[str, str]] | None = None,
                     max_new_tokens: int | None = None, temperature: float | None = None,
                     top_k: int = 0, top_p: float | None = None, seed: int | None = None,
                     stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                     ignore_eos: bool = False, logprobs: bool = False, top_logprobs: int = 0,
                     request_id: str | None = None) -> router_pb2.GenerateRequest:
    """A GenerateRequest; None leaves an optional field unset (the server's default)."""
    sampling = router_pb2.SamplingParams(top_k=top_k, stop=stop, stop_token_ids=stop_token_ids,
                                         ignore_eos=ignore_eos, logprobs=logprobs,
                                         top_logprobs=top_logprobs)
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    request = router_pb2.GenerateRequest(sampling=sampling)
    if messages is not None:
        request.chat.messages.extend(
            common_pb2.ChatMessage(role=role, content=content) for role, content in messages)
    if prompt is not None:
        request.prompt = prompt
    if request_id is not None:
        request.request_id = request_id
    return request


class RouterClient:
    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None,
                 api_key: str | None = None) -> None:
        """A client of the router at `address` (TLS with `credentials`); `api_key` is sent as
        `authorization: Bearer` on every call (a router started with --api-keys-file)."""
        self.address = address
        self.channel = open_channel(address, credentials, channel_options(), api_key)
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **params: object) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Stream the responses of one generation (see `generate_request` for the params).
        Leaving the loop early cancels the call, which frees the sequence on every shard."""
        call = self.stub.Generate(generate_request(prompt, **params),  # type: ignore[arg-type]
                                  timeout=timeout)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def complete(self, prompt: str | None = None, *, timeout: float | None = None,
                       **params: object) -> Completion:
        """The whole generation, joined."""
        done, t0 = Completion(), time.perf_counter()
        async for r in self.generate(prompt, timeout=timeout, **params):
            done.arrivals_s.append(time.perf_counter() - t0)
            done.add(r)
        return done

    async def model_info(self, timeout: float = 10.0) -> router_pb2.ModelInfoResponse:
        return await self.stub.ModelInfo(router_pb2.ModelInfoRequest(), timeout=timeout)

    async def health(self, service: str = "", timeout: float = 2.0) -> int | None:
        """The router's grpc.health.v1 status, or None when it does not answer."""
        try:
            r = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                         timeout=timeout)
        except grpc.aio.AioRpcError:
            return None
        return int(r.status)


async def _main(args: argparse.Namespace) -> int:
    key = args.api_key_file.read_text().strip() if args.api_key_file else None
    async with RouterClient(args.router, api_key=key) as client:
        messages = [("user", args.prompt)] if args.chat else None
        try:
            async for r in client.generate(None if args.chat else args.prompt,
                                           messages=messages, max_new_tokens=args.max_new_tokens,
                                           temperature=args.temperature, seed=args.seed,
                                           timeout=args.timeout):
                print(r.text, end="", flush=True)
                if r.finish_reason:
                    print(f"\n[{r.finish_detail}; {r.usage.generated_tokens} tokens, ttft "
                          f"{r.usage.time_to_first_token_s:.3f} s, {r.usage.total_s:.3f} s]",
                          file=sys.stderr)
        except grpc.aio.AioRpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Stream one generation from a cpumesh router.")
    p.add_argument("prompt")
    p.add_argument("--router", default="127.0.0.1:50051")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user message")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--api-key-file", type=Path, help="the router's API key, from this file")
    return asyncio.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
