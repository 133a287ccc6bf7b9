"""Router validation, group consistency checks, config and protobuf conversion: pure parts."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from router_svc.config import RouterConfig
from router_svc.request import GenerateRequest, Limits, check_prompt_length, validate
from router_svc.sequence import Chunk, Usage
from router_svc.servicer import from_pb, to_pb
from router_svc.shards import ShardInfo, check_group
from router_svc.stops import Finish, FinishReason
from services.errors import InvalidArgument, Unavailable
from services.pb.cpumesh.v1 import common_pb2, router_pb2
from tools.client import generate_request

LIMITS = Limits(context_length=2048, vocab_size=1000, has_chat_template=True,
                max_stop_strings=4, max_stop_string_chars=8, max_stop_token_ids=3)
OK = GenerateRequest(prompt="hi")

BAD = [  # (request, the field the error must name)
    (GenerateRequest(), "input"),
    (GenerateRequest(prompt="a", messages=(("user", "b"),)), "input"),
    (GenerateRequest(prompt=""), "prompt"),
    (GenerateRequest(messages=()), "chat.messages"),
    (GenerateRequest(messages=(("user", "a"), ("", "b"))), "chat.messages[1].role"),
    (replace(OK, max_new_tokens=0), "sampling.max_new_tokens"),
    (replace(OK, max_new_tokens=2049), "sampling.max_new_tokens"),
    (replace(OK, temperature=-0.1), "sampling.temperature"),
    (replace(OK, temperature=math.nan), "sampling.temperature"),
    (replace(OK, temperature=math.inf), "sampling.temperature"),
    (replace(OK, top_k=1025), "sampling.top_k"),
    (replace(OK, top_k=-1), "sampling.top_k"),
    (replace(OK, top_p=0.0), "sampling.top_p"),
    (replace(OK, top_p=1.5), "sampling.top_p"),
    (replace(OK, top_p=math.nan), "sampling.top_p"),
    (replace(OK, stop=("a", "b", "c", "d", "e")), "sampling.stop"),
    (replace(OK, stop=("a", "")), "sampling.stop[1]"),
    (replace(OK, stop=("123456789",)), "sampling.stop[0]"),
    (replace(OK, stop_token_ids=(1, 2, 3, 4)), "sampling.stop_token_ids"),
    (replace(OK, stop_token_ids=(5, 1000)), "sampling.stop_token_ids[1]"),
    (replace(OK, top_logprobs=3), "sampling.top_logprobs"),
    (replace(OK, logprobs=True, top_logprobs=21), "sampling.top_logprobs"),
    (replace(OK, request_id=""), "request_id"),
    (replace(OK, request_id="x" * 257), "request_id"),
    (replace(OK, request_id="a\nb"), "request_id"),
]


@pytest.mark.parametrize(("request_", "field"), BAD, ids=[f for _, f in BAD])
def test_each_bad_field_is_named(request_: GenerateRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        validate(request_, LIMITS)
    assert str(e.value).startswith(field), str(e.value)


def test_valid_requests_pass() -> None:
    for r in [OK, GenerateRequest(messages=(("system", ""), ("user", "x"))),
              replace(OK, max_new_tokens=2048, temperature=0.0, top_k=1024, top_p=1.0,
                      seed=2**64 - 1, stop=("abcdefgh",) * 4, stop_token_ids=(0, 999),
                      logprobs=True, top_logprobs=20, request_id="req-1")]:
        validate(r, LIMITS)
    with pytest.raises(InvalidArgument, match="no chat template"):
        validate(GenerateRequest(messages=(("user", "x"),)),
                 replace(LIMITS, has_chat_template=False))


def test_prompt_length_against_the_context() -> None:
    check_prompt_length(2000, 48, LIMITS)
    check_prompt_length(2047, None, LIMITS)
    with pytest.raises(InvalidArgument, match=r"prompt \(2000 tokens\) \+ sampling"):
        check_prompt_length(2000, 49, LIMITS)
    with pytest.raises(InvalidArgument, match="context length"):
        check_prompt_length(2048, None, LIMITS)


def test_protobuf_round_trip_keeps_unset_apart_from_zero() -> None:
    r = from_pb(generate_request("hi", temperature=0.0, seed=0, top_p=0.5, stop=["x"],
                                 request_id="r"))
    assert (r.temperature, r.seed, r.top_p, r.stop, r.request_id) == (0.0, 0, 0.5, ("x",), "r")
    r = from_pb(generate_request(messages=[("user", "x")]))
    assert r.prompt is None and r.messages == (("user", "x"),)
    assert (r.temperature, r.seed, r.max_new_tokens, r.top_p) == (None, None, None, None)
    assert from_pb(router_pb2.GenerateRequest()).prompt is None
    last = to_pb("id", Chunk(text="x", token_ids=(2,), finish=Finish(FinishReason.STOP, "eos"),
                             stop_token_id=2, usage=Usage(3, 1, 0.5, 1.0)))
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert last.WhichOneof("matched_stop") == "stop_token_id" and last.stop_token_id == 2
    assert (last.usage.prompt_tokens, last.usage.total_s) == (3, 1.0)
    assert to_pb("id", Chunk(text="y")).WhichOneof("matched_stop") is None


def info(rank: int, **changes: object) -> ShardInfo:
    cut = [0, 500, 1000]
    base = ShardInfo(address=f"h:{rank}", model_fingerprint="f", model_name="m", tp_rank=rank,
                     tp_size=2, vocab_range=(cut[rank], cut[rank + 1]), vocab_size=1000,
                     dtype="float32", kv_capacity_tokens=1000 + rank, kv_free_tokens=5,
                     kv_page_size=16, max_context=4096 - rank, max_top_k=1024,
                     next_step_id=7 + rank)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_group_consistency() -> None:
    g = check_group([info(0), info(1)])
    assert (g.kv_capacity_tokens, g.max_context, g.next_step_id, g.tp_size) == (1000, 4095, 8, 2)
    for infos, message in [
        ([info(1), info(0)], "rank 1 of 2; the router expects rank 0"),
        ([info(0), info(1, tp_size=3)], "rank 1 of 3"),
        ([info(0), info(1, model_fingerprint="g")], "model_fingerprint"),
        ([info(0), info(1, kv_page_size=8)], "kv_page_size"),
        ([info(0), info(1, vocab_range=(600, 1000))], "do not tile"),
        ([info(0), info(1, vocab_range=(500, 900))], "do not tile"),
    ]:
        with pytest.raises(Unavailable, match=message):
            check_group(infos)


def test_config_refusals() -> None:
    ok = RouterConfig(tokenizer="t:1", shards=("a:1", "b:2"))
    for changes, message in [
        ({"shards": ()}, "at least one"), ({"shards": ("a:1", "a:1")}, "twice"),
        ({"shards": ("nope",)}, "host:port"), ({"tokenizer": "x"}, "host:port"),
        ({"max_waiting": 0}, "max_waiting"), ({"step_timeout_s": 0.0}, "step_timeout_s"),
        ({"step_timeout_s": math.nan}, "step_timeout_s"),
        ({"tls_cert": "c"}, "both"),
    ]:
        with pytest.raises(ValueError, match=message):
            replace(ok, **changes)  # type: ignore[arg-type]
