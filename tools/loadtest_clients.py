"""The two clients of `cpumesh loadtest`: a cpumesh router over gRPC, and an OpenAI-compatible
HTTP server (streamed `/v1/completions`, server-sent events). Each turns one request into a
`Sample` of client-side timings; failures become samples with an error code, never exceptions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Sample:
    ok: bool
    code: str = "OK"  # gRPC status name, "HTTP 503", or an exception's class name
    ttft_s: float | None = None
    e2e_s: float = 0.0
    output_tokens: int = 0
    requested_tokens: int = 0  # max_tokens asked for (EOS ignored: the length expected)
    itl_s: list[float] = field(default_factory=list)  # per token, after the first

    def mean_itl_s(self) -> float | None:
        return sum(self.itl_s) / len(self.itl_s) if self.itl_s else None


class Timeline:
    """Arrival times of streamed tokens, turned into TTFT and per-token gaps."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.last: float | None = None
        self.sample = Sample(ok=True)

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        self.sample.output_tokens += n
        if self.last is None:
            self.sample.ttft_s = now - self.t0
            self.sample.itl_s.extend([0.0] * (n - 1))  # arrived together with the first
        else:
            self.sample.itl_s.extend([(now - self.last) / n] * n)  # a chunk of n tokens
        self.last = now

    def done(self, ok: bool = True, code: str = "OK") -> Sample:
        self.sample.e2e_s = time.perf_counter() - self.t0
        self.sample.ok, self.sample.code = ok, code
        return self.sample


class Client(Protocol):
    async def request(self, prompt: str, max_tokens: int, timeout_s: float) -> Sample: ...

    async def close(self) -> None: ...


class GrpcClient:
    def __init__(self, address: str) -> None:
        from tools.client import RouterClient

        self.router = RouterClient(address)

    async def request(self, prompt: str, max_tokens: int, timeout_s: float) -> Sample:
        import grpc

        line = Timeline()
        try:
            async for r in self.router.generate(prompt, max_new_tokens=max_tokens,
                                                temperature=0.0, ignore_eos=True,
                                                timeout=timeout_s):
                line.tokens(len(r.token_ids))
        except grpc.aio.AioRpcError as e:
            return line.done(False, e.code().name)
        except (TimeoutError, OSError) as e:
            return line.done(False, type(e).__name__)
        return line.done()

    async def close(self) -> None:
        await self.router.close()


class HttpClient:
    """POST {base}/v1/completions with stream=true; tokens counted from usage when the server
    sends it, else one per non-empty chunk.

    A fixed output length is asked for in every dialect a server may understand, since unknown
    fields are ignored by OpenAI-compatible servers (cpumesh's and vLLM's included):
    `ignore_eos` (vLLM, cpumesh) and `min_tokens` = `max_tokens` (vLLM, llama-cpp-python, whose
    server ignores `ignore_eos` and masks the model's EOS token until `min_tokens`)."""

    def __init__(self, base_url: str, model: str) -> None:
        self.url = base_url.rstrip("/").removesuffix("/v1") + "/v1/completions"
        self.model = model
        self.session: Any = None

    async def request(self, prompt: str, max_tokens: int, timeout_s: float) -> Sample:
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0))
        body = {"prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
                "temperature": 0.0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        line = Timeline()
        usage_tokens: int | None = None
        try:
            async with self.session.post(self.url, json=body,
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                if resp.status != 200:
                    await resp.read()
                    return line.done(False, f"HTTP {resp.status}")
                async for event in sse_events(resp.content):
                    if event == "[DONE]":
                        break
                    data = json.loads(event)
                    if data.get("error"):
                        return line.done(False, "stream error")
                    choices = data.get("choices") or []
                    if choices and choices[0].get("text"):
                        line.tokens(1)
                    if data.get("usage"):
                        usage_tokens = data["usage"].get("completion_tokens")
        except (TimeoutError, aiohttp.ClientError, ValueError, OSError) as e:
            return line.done(False, type(e).__name__)
        sample = line.done()
        if usage_tokens is not None and usage_tokens >= sample.output_tokens:
            sample.output_tokens = usage_tokens
        return sample

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


async def sse_events(stream: Any) -> Any:
    """The `data` of each server-sent event: lines joined, comments and other fields skipped,
    events ended by a blank line (CRLF, LF or CR), a last event without one still delivered."""
    data: list[str] = []
    buffer = b""
    async for chunk in stream.iter_any():
        buffer += chunk
        hold = b"\r" if buffer.endswith(b"\r") else b""  # maybe the first half of a CRLF
        body = buffer[:-1] if hold else buffer
        *lines, rest = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        buffer = rest + hold
        for raw in lines:
            text = raw.decode("utf-8", errors="replace")
            if not text:
                if data:
                    yield "\n".join(data)
                    data = []
            elif text.startswith("data:"):
                data.append(text[5:].removeprefix(" "))
    buffer = buffer.rstrip(b"\r")
    if buffer.startswith(b"data:"):
        data.append(buffer.decode("utf-8", errors="replace")[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def make_client(target: str, model: str = "") -> Client:
    if target.startswith("grpc://"):
        return GrpcClient(target.removeprefix("grpc://"))
    if target.startswith(("http://", "https://")):
        return HttpClient(target, model)
    raise ValueError(f"target must start with grpc://, http:// or https://, got {target!r}")
