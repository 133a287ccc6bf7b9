"""A generation request as the engine sees it, and its validation before any work.

The servicer copies the protobuf fields into `GenerateRequest` (unset optional fields stay None)
and `validate` checks every one against the served model's `Limits`, raising `InvalidArgument`
whose message starts with the field's name in the proto (`sampling.top_p`, `chat.messages[1].role`).
The prompt's UTF-8 bytes and a chat's message count are bounded here, before anything is sent to
the tokenizer. Nothing here does I/O: the prompt's token count is checked later, once it is
tokenized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from router_svc.sampling import SamplingParams
from services.errors import InvalidArgument
from services.limits import MAX_TOP_K

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Limits:
    """What the served model and the router's configuration allow."""

    context_length: int
    vocab_size: int
    has_chat_template: bool
    max_top_k: int = MAX_TOP_K
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    max_request_id_chars: int = 256
    max_prompt_bytes: int = 2**62  # UTF-8 bytes of a prompt, or of a chat's roles and contents
    max_chat_messages: int = 4096


@dataclass(frozen=True)
class GenerateRequest:
    """Exactly one of `prompt` and `messages` ((role, content) pairs) is meant to be set."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    request_id: str | None = None

    def sampling_params(self) -> SamplingParams:
        """The sampler's parameters (valid once `validate` passed)."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_k=self.top_k, top_p=1.0 if self.top_p is None else float(self.top_p),
            seed=self.seed)


def validate(r: GenerateRequest, limits: Limits) -> None:
    """Raise InvalidArgument naming the first bad field; return None when all are valid."""
    _check_input(r, limits)
    if r.max_new_tokens is not None and not 1 <= r.max_new_tokens <= limits.context_length:
        raise InvalidArgument(f"sampling.max_new_tokens must be in [1, {limits.context_length}] "
                              f"(the model's context length), got {r.max_new_tokens}")
    if r.temperature is not None and not (math.isfinite(r.temperature) and r.temperature >= 0):
        raise InvalidArgument(
            f"sampling.temperature must be a finite number >= 0 (0 = greedy), got {r.temperature}")
    if not 0 <= r.top_k <= limits.max_top_k:
        raise InvalidArgument(
            f"sampling.top_k must be in [0, {limits.max_top_k}] (0 = no limit), got {r.top_k}")
    if r.top_p is not None and not 0 < r.top_p <= 1:  # NaN fails both comparisons
        raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {r.top_p}")
    if r.seed is not None and not 0 <= r.seed < 2**64:
        raise InvalidArgument(f"sampling.seed must be a 64-bit unsigned integer, got {r.seed}")
    _check_stops(r, limits)
    if not 0 <= r.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"sampling.top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], "
                              f"got {r.top_logprobs}")
    if r.top_logprobs and not r.logprobs:
        raise InvalidArgument("sampling.top_logprobs needs sampling.logprobs set")
    if r.request_id is not None:
        if not r.request_id or len(r.request_id) > limits.max_request_id_chars:
            raise InvalidArgument(f"request_id must have 1 to {limits.max_request_id_chars} "
                                  f"characters, got {len(r.request_id)}")
        if not r.request_id.isprintable():
            raise InvalidArgument("request_id must be printable (no control characters)")


def _check_input(r: GenerateRequest, limits: Limits) -> None:
    if (r.prompt is None) == (r.messages is None):
        raise InvalidArgument("input: set exactly one of prompt and chat")
    if r.prompt is not None:
        if not r.prompt:
            raise InvalidArgument("prompt must not be empty")
        check_prompt_bytes("prompt", utf8_bytes(r.prompt, limits.max_prompt_bytes), limits)
        return
    assert r.messages is not None
    if not limits.has_chat_template:
        raise InvalidArgument("chat: the model has no chat template; send a plain prompt")
    if not r.messages:
        raise InvalidArgument("chat.messages must not be empty")
    check_chat_messages(len(r.messages), limits)
    for i, (role, _) in enumerate(r.messages):
        if not role:
            raise InvalidArgument(f"chat.messages[{i}].role must not be empty")
    total = 0
    for role, content in r.messages:
        total += utf8_bytes(role, limits.max_prompt_bytes) + utf8_bytes(
            content, limits.max_prompt_bytes)
        if total > limits.max_prompt_bytes:
            break
    check_prompt_bytes("chat.messages (their roles and contents together)", total, limits)


def utf8_bytes(text: str, cap: int) -> int:
    """`text`'s UTF-8 length when it is at most `cap`, else some number above `cap`: encodes
    nothing when the characters decide (ASCII, or more characters than `cap`)."""
    if len(text) > cap or text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def check_prompt_bytes(what: str, nbytes: int, limits: Limits) -> None:
    if nbytes > limits.max_prompt_bytes:
        raise InvalidArgument(f"{what} is over the limit of {limits.max_prompt_bytes} UTF-8 "
                              "bytes (--max-prompt-bytes)")


def check_chat_messages(count: int, limits: Limits) -> None:
    if count > limits.max_chat_messages:
        raise InvalidArgument(f"chat.messages has {count} messages, more than the limit of "
                              f"{limits.max_chat_messages} (--max-chat-messages)")


def _check_stops(r: GenerateRequest, limits: Limits) -> None:
    if len(r.stop) > limits.max_stop_strings:
        raise InvalidArgument(f"sampling.stop has {len(r.stop)} strings, more than the limit "
                              f"of {limits.max_stop_strings}")
    for i, s in enumerate(r.stop):
        if not s or len(s) > limits.max_stop_string_chars:
            raise InvalidArgument(f"sampling.stop[{i}] must have 1 to "
                                  f"{limits.max_stop_string_chars} characters, got {len(s)}")
    if len(r.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidArgument(f"sampling.stop_token_ids has {len(r.stop_token_ids)} ids, more "
                              f"than the limit of {limits.max_stop_token_ids}")
    for i, t in enumerate(r.stop_token_ids):
        if not 0 <= t < limits.vocab_size:
            raise InvalidArgument(f"sampling.stop_token_ids[{i}] = {t} is outside the "
                                  f"vocabulary (0 to {limits.vocab_size - 1})")


def max_request_size(limits: Limits) -> int:
    """The most bytes a GenerateRequest within `limits` can have: the prompt's (or the chat's
    roles and contents), each field's tag and length, stop strings (4 bytes a character at most),
    stop token ids, request id, and 1 KiB for the fixed-size fields."""
    framing = 12  # a tag and a length of up to 10 bytes
    return (limits.max_prompt_bytes + framing * (2 * limits.max_chat_messages + 2)
            + limits.max_stop_strings * (4 * limits.max_stop_string_chars + framing)
            + limits.max_stop_token_ids * 11 + 4 * limits.max_request_id_chars + 1024)


def check_prompt_length(prompt_tokens: int, max_new_tokens: int | None, limits: Limits) -> None:
    """After tokenization: the prompt and its generation must fit the context."""
    if prompt_tokens < 1:
        raise InvalidArgument("prompt: tokenized to no tokens at all")
    total = prompt_tokens + (max_new_tokens or 1)
    if total > limits.context_length:
        what = (f"prompt ({prompt_tokens} tokens) + sampling.max_new_tokens ({max_new_tokens})"
                if max_new_tokens is not None else f"prompt ({prompt_tokens} tokens) + 1")
        raise InvalidArgument(f"{what} = {total} tokens exceeds the model's context length "
                              f"({limits.context_length} tokens)")


def default_max_new_tokens(prompt_tokens: int, room: int, cap: int) -> tuple[int, str]:
    """max_new_tokens of a request that set none, and the detail of its length finish: `cap`
    (--default-max-new-tokens), but never past `room` (the context, or what the KV cache can
    ever hold)."""
    left = max(1, room - prompt_tokens)
    if cap < left:
        return cap, f"default max_new_tokens {cap} reached (--default-max-new-tokens)"
    return left, f"context length {room}"
