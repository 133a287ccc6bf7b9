"""The router's bounds before work, as pure bookkeeping: in-flight tickets, waiting slots taken
before tokenization, prompt bytes and chat message counts, and the size bound on raw requests.
"""

from __future__ import annotations

import pytest

from router_svc.admission import Admission
from router_svc.config import RouterConfig
from router_svc.request import GenerateRequest, Limits, max_request_size, utf8_bytes, validate
from router_svc.scheduler import Scheduler, SchedulerConfig
from services.errors import InvalidArgument, ResourceExhausted
from tools.client import generate_request

LIMITS = Limits(context_length=512, vocab_size=100, has_chat_template=True,
                max_prompt_bytes=1000, max_chat_messages=5)


def test_admission_counts_requests_and_bytes_and_gives_them_back() -> None:
    a = Admission(max_requests=2, max_bytes=100)
    first = a.enter(60)
    with pytest.raises(ResourceExhausted, match="--max-inflight-bytes"):
        a.enter(41)
    second = a.enter(40)
    with pytest.raises(ResourceExhausted, match="--max-inflight-requests"):
        a.enter(0)
    assert (a.requests, a.bytes, a.refused) == (2, 100, 2)
    first.release()
    first.release()  # idempotent
    assert (a.requests, a.bytes) == (1, 40)
    third = a.enter(0)
    with pytest.raises(ResourceExhausted):
        third.grow(61)
    third.grow(60)
    assert a.bytes == 100
    second.release()
    third.release()
    assert (a.requests, a.bytes) == (0, 0)


def test_waiting_slots_reserved_before_tokenizing_count_against_the_queue() -> None:
    s = Scheduler(SchedulerConfig(kv_capacity_tokens=1024, max_waiting=3))
    s.reserve_waiting()
    s.reserve_waiting()
    s.submit(1, 4, 4)  # not reserved: takes the last free slot
    with pytest.raises(ResourceExhausted):
        s.reserve_waiting()
    with pytest.raises(InvalidArgument):  # refused: the slot stays reserved
        s.submit(2, 4, 10_000, reserved=True)
    assert s.num_reserved_waiting == 2
    s.submit(2, 4, 4, reserved=True)
    s.unreserve_waiting()  # the other one failed in the tokenizer
    assert (s.num_waiting, s.num_reserved_waiting) == (2, 0)
    s.reserve_waiting()
    with pytest.raises(ValueError):
        s.unreserve_waiting()
        s.unreserve_waiting()
    plan = s.schedule()
    assert plan.prefill == (1, 2)


@pytest.mark.parametrize("text", ["a" * 999, "é" * 500, "€" * 333, "😀" * 250, "x" * 5000,
                                  "é" * 499 + "ab", "\ud800" * 10])
def test_utf8_bytes_is_exact_within_the_cap_and_above_it_beyond(text: str) -> None:
    exact = len(text.encode("utf-8", "surrogatepass"))
    got = utf8_bytes(text, 1000)
    assert got == exact if exact <= 1000 else got > 1000


def test_prompt_bytes_are_utf8_bytes_not_characters() -> None:
    validate(GenerateRequest(prompt="é" * 500), LIMITS)  # 1000 bytes: at the limit
    with pytest.raises(InvalidArgument, match=r"^prompt is over the limit of 1000 UTF-8 bytes"):
        validate(GenerateRequest(prompt="é" * 500 + "a"), LIMITS)  # 501 characters
    with pytest.raises(InvalidArgument, match="--max-prompt-bytes"):
        validate(GenerateRequest(prompt="a" * 10**6), LIMITS)


def test_a_chat_is_bounded_by_messages_and_by_its_roles_and_contents_together() -> None:
    ok = tuple(("user", "x" * 196) for _ in range(5))  # 5 x 200 bytes
    validate(GenerateRequest(messages=ok), LIMITS)
    with pytest.raises(InvalidArgument, match=r"^chat.messages has 6 messages, more than the "
                                              r"limit of 5 \(--max-chat-messages\)"):
        validate(GenerateRequest(messages=(("user", ""),) * 6), LIMITS)
    with pytest.raises(InvalidArgument, match=r"^chat.messages \(their roles and contents"):
        validate(GenerateRequest(messages=(*ok[:4], ("user", "x" * 197))), LIMITS)


def test_max_request_size_bounds_the_largest_request_within_the_limits() -> None:
    """Every field at its limit, encoded: the bound is above it, and not far above."""
    limits = Limits(context_length=512, vocab_size=2**31 - 1, has_chat_template=True,
                    max_prompt_bytes=100_000, max_chat_messages=4096)
    stops = ["😀" * (limits.max_stop_string_chars // 2)] * limits.max_stop_strings
    sampling = dict(max_new_tokens=2**31 - 1, temperature=1e30, top_k=2**31 - 1, top_p=0.5,
                    seed=2**64 - 1, stop=stops,
                    stop_token_ids=[2**31 - 2] * limits.max_stop_token_ids, logprobs=True,
                    top_logprobs=20, ignore_eos=True, request_id="😀" * 256)
    prompt = generate_request("😀" * (limits.max_prompt_bytes // 4), **sampling)  # type: ignore[arg-type]
    per = limits.max_prompt_bytes // limits.max_chat_messages  # roles and contents together
    chat = generate_request(messages=[("u", "c" * (per - 1))] * limits.max_chat_messages,
                            **sampling)  # type: ignore[arg-type]
    bound = max_request_size(limits)
    for r in (prompt, chat):
        assert r.ByteSize() <= bound < r.ByteSize() + 150_000


def test_derived_prompt_limit_and_config_bounds() -> None:
    base = dict(tokenizer="t:1", shards=("s:1",))
    assert RouterConfig(**base).prompt_bytes_limit(8192) == 8192 * 32  # type: ignore[arg-type]
    cfg = RouterConfig(**base, max_prompt_bytes=1234)  # type: ignore[arg-type]
    assert cfg.prompt_bytes_limit(8192) == 1234
    with pytest.raises(ValueError, match="max_chat_messages"):
        RouterConfig(**base, max_chat_messages=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_inflight_bytes"):
        RouterConfig(**base, max_inflight_bytes=10, max_request_bytes=11)  # type: ignore[arg-type]
