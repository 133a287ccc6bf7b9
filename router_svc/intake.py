"""A request's way into the queue: tokenized, checked against the limits and the KV cache, and
queued as a `Sequence`, or refused before any chunk is streamed."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from router_svc.config import RouterConfig
from router_svc.request import GenerateRequest, Limits, check_prompt_length, default_max_new_tokens
from router_svc.scheduler import Scheduler
from router_svc.sequence import Sequence
from router_svc.served_model import ServedModel
from router_svc.tokenizer_client import TokenizerClient


async def queue_request(request: GenerateRequest, model: ServedModel, limits: Limits,
                        scheduler: Scheduler, tokenizer: TokenizerClient, config: RouterConfig,
                        seq_id: int, arrival: float, check_serving: Callable[[], None]
                        ) -> Sequence:
    """Tokenize a validated request and queue it in `scheduler`. A waiting slot is taken before
    the prompt goes to the tokenizer (ResourceExhausted when the queue, counting requests being
    tokenized, is full); `check_serving` raises if the group stopped serving meanwhile."""
    scheduler.reserve_waiting()  # before tokenizing: a burst's excess is refused at once
    queued = False
    try:
        prompt_ids = await tokenizer.encode(request.prompt, request.messages,
                                            config.rpc_timeout_s)
        check_prompt_length(len(prompt_ids), request.max_new_tokens, limits)
        check_serving()
        max_new, detail = request.max_new_tokens, None
        if max_new is None:  # the default cap, within the context and the whole KV cache
            max_new, detail = default_max_new_tokens(
                len(prompt_ids), min(model.context_length, scheduler.kv_capacity_tokens),
                config.default_max_new_tokens)
        seq = Sequence(seq_id, request.request_id or uuid.uuid4().hex, request, prompt_ids,
                       max_new, model.eos_token_ids, arrival, detail, model.group.max_top_k)
        scheduler.submit(seq.seq_id, len(prompt_ids), max_new, reserved=True)
        queued = True
    finally:
        if not queued:  # refused, failed or cancelled while tokenizing: the slot goes back
            scheduler.unreserve_waiting()
    return seq
