"""Teacher-forced decoding through the sliced model with a chosen KV dtype: in process (tp 1) and
in the mesh test ranks (tests.mesh_procs), for the int8 KV tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PROMPTS = [[5, 17, 42, 7, 99, 250, 3, 8, 1, 60], [11], [200, 201, 202, 13, 14]]
FORCED = [[31 + 7 * t + 13 * i for i in range(len(PROMPTS))] for t in range(10)]  # ids < 301


def forced(model_dir: Any, comm: Any, kv_dtype: Any, page_size: int = 4) -> list[Any]:
    """Prefill PROMPTS, then a decode step per row of FORCED (every sequence fed that row's id,
    whatever it predicted): each step's local logits [B, V]. The decode steps attend to the
    cache, so their logits see K and V as the cache stores them."""
    from model_formats.checkpoint import load_model_config
    from shard_svc.model import ShardModel, make_batch
    from shard_svc.sharding import plan_shard
    from shard_svc.weights import load_shard_weights

    config = load_model_config(model_dir)
    plan = plan_shard(config, comm.tp_rank, comm.tp_size)
    model = ShardModel(config, plan, load_shard_weights(model_dir, config, plan), comm)
    cache = model.new_cache(capacity_tokens=512, page_size=page_size, kv_dtype=kv_dtype)
    steps = [(i, p) for i, p in enumerate(PROMPTS)]
    logits = []
    for row in [None, *FORCED]:
        if row is not None:
            steps = [(i, [t]) for i, t in enumerate(row)]
        logits.append(model.local_logits(model.forward(make_batch(steps, cache), cache)))
    return logits


def rank_forced(report: Callable[..., None], tp_rank: int, mesh_ports: list[int],
                model_dir: Any) -> None:
    import torch

    from shard_svc.mesh.group import MeshGroup
    from tests.mesh_ranks import mesh_config

    with MeshGroup(mesh_config(tp_rank, mesh_ports, transport="tcp")) as mesh:
        logits = forced(model_dir, mesh, torch.int8)
        # numpy, not tensors: torch would pass tensors as shared memory that dies with us
        report("done", [x.numpy() for x in logits])
