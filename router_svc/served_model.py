"""What the router serves: the shard group and the tokenizer, probed and checked to agree."""

from __future__ import annotations

from dataclasses import dataclass

from router_svc.config import RouterConfig, default_served_name
from router_svc.request import Limits
from router_svc.shards import GroupInfo, ShardGroup, check_group
from router_svc.tokenizer_client import TokenizerClient, TokenizerInfo
from services.errors import Unavailable


@dataclass(frozen=True)
class ServedModel:
    group: GroupInfo
    tokenizer: TokenizerInfo

    @property
    def context_length(self) -> int:
        return self.group.max_context

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """End-of-sequence and end-of-turn tokens: generation ends on any (unless ignore_eos)."""
        t = self.tokenizer
        return tuple(dict.fromkeys((*t.eos_token_ids, *t.end_of_turn_token_ids)))

    def served_name(self, config: RouterConfig) -> str:
        """The model's name in the APIs: the configured one, else the shards' model name
        without its cache hash."""
        return config.served_model_name or default_served_name(self.group.model_name)

    def limits(self, config: RouterConfig) -> Limits:
        return Limits(
            context_length=self.context_length, vocab_size=self.group.vocab_size,
            has_chat_template=self.tokenizer.has_chat_template,
            max_top_k=self.group.max_top_k, max_stop_strings=config.max_stop_strings,
            max_stop_string_chars=config.max_stop_string_chars,
            max_stop_token_ids=config.max_stop_token_ids,
            max_request_id_chars=config.max_request_id_chars,
            max_prompt_bytes=config.prompt_bytes_limit(self.context_length),
            max_chat_messages=config.max_chat_messages)


async def probe(shards: ShardGroup, tokenizer: TokenizerClient, timeout: float) -> ServedModel:
    """The served model when every shard is SERVING and the group and tokenizer agree;
    otherwise Unavailable saying what is missing or inconsistent."""
    serving = await shards.health_all(timeout)
    if not all(serving):
        down = [a for a, ok in zip(shards.addresses, serving, strict=True) if not ok]
        raise Unavailable(f"shard(s) {', '.join(down)} not SERVING")
    if not await tokenizer.healthy(timeout):
        raise Unavailable(f"tokenizer {tokenizer.address} not SERVING")
    group = check_group(await shards.info_all(timeout))
    info = await tokenizer.info(timeout)
    if info.vocab_size != group.vocab_size:
        raise Unavailable(f"tokenizer {tokenizer.address} has a vocabulary of {info.vocab_size} "
                          f"tokens, the shards {group.vocab_size}: not the same model")
    return ServedModel(group, info)
