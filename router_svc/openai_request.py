"""OpenAI request bodies (JSON) as `GenerateRequest`s, for the HTTP API.

Type errors and unsupported features raise InvalidArgument naming OpenAI's parameter; the values
themselves are judged by `validate` in `Engine.submit`, as over gRPC. `max_body_bytes` bounds a
body before it is read: the most any request within the model's limits can take in JSON.
"""

from __future__ import annotations

import json
from typing import Any

from router_svc.request import GenerateRequest, Limits, check_chat_messages, max_request_size
from services.errors import InvalidArgument

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
JSON_BYTES_PER_BYTE = 6  # a UTF-8 byte's longest JSON form ("\u0001")
JSON_BYTES_PER_MESSAGE = 64  # '{"role": "", "content": ""}, ', pretty-printed
JSON_SLACK_BYTES = 64 * 1024  # the other fields


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


def max_body_bytes(limits: Limits, max_request_bytes: int) -> int:
    """The largest body accepted: `--max-request-bytes`, or less when no request within the
    model's limits could be that long in JSON."""
    return min(max_request_bytes, JSON_BYTES_PER_BYTE * max_request_size(limits)
               + JSON_BYTES_PER_MESSAGE * limits.max_chat_messages + JSON_SLACK_BYTES)


def completion_request(body: dict[str, Any], limits: Limits | None = None) -> GenerateRequest:
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


def chat_request(body: dict[str, Any], limits: Limits | None = None) -> GenerateRequest:
    """The chat's request; with `limits`, its message count is checked before any is read."""
    messages = _get(body, "messages", (list,), [])
    if limits is not None:
        check_chat_messages(len(messages), limits)
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


def decode(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError included
        raise InvalidArgument(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    return body
