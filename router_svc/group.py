"""The shard group as the engine serves it: waiting until it is whole, and its scheduler."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from collections.abc import Sequence as Seq

from router_svc.config import RouterConfig
from router_svc.scheduler import Scheduler, SchedulerConfig
from router_svc.served_model import ServedModel, probe
from router_svc.shards import GroupInfo, ShardGroup
from router_svc.tokenizer_client import TokenizerClient
from services.errors import CpumeshError
from services.page_table import PageTable

log = logging.getLogger("cpumesh.router")


async def until_whole(shards: ShardGroup, tokenizer: TokenizerClient, config: RouterConfig,
                      step_id: int, waiting: Callable[[str], None]) -> tuple[ServedModel, int]:
    """Poll until every shard is SERVING and consistent and the tokenizer answers; reset the
    shards to a fresh step id (after `step_id`) and return it with the model. `waiting` gets
    each failed poll's reason."""
    last = None
    while True:
        try:
            model = await probe(shards, tokenizer, config.rpc_timeout_s)
            next_id = max(step_id, model.group.next_step_id) + 1
            await shards.reset_all(next_id, config.rpc_timeout_s)
            return model, next_id
        except CpumeshError as e:
            if str(e) != last:
                log.warning("waiting for the shard group: %s", e)
                last = str(e)
            waiting(str(e))
            await asyncio.sleep(config.recover_poll_s)


def group_scheduler(config: RouterConfig, group: GroupInfo,
                    prefill_ids: Callable[[int], Seq[int]]) -> Scheduler:
    """A scheduler for the freshly reset group, with a replica of its shards' page table (the
    smallest rank's capacity; prefix caching as the ranks do it)."""
    sched = SchedulerConfig(
        kv_capacity_tokens=group.kv_capacity_tokens, kv_page_size=group.kv_page_size,
        max_waiting=config.max_waiting, max_running=config.max_running,
        prefill_token_budget=config.prefill_token_budget, kv_reservation=config.kv_reservation)
    pages = PageTable(sched.kv_capacity_pages, sched.kv_page_size, group.prefix_cache)
    return Scheduler(sched, pages, prefill_ids)
