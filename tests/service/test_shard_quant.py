"""`python -m shard_svc --dtype int4` on a linked GGUF, two ranks over loopback: served at its own
precision (the log says so, Info says int4), the greedy tokens of the same int4 model in process
(tp 2, same kernels); how close int4 stays to float is test_gguf_quant's and test_quality's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType as Q

from model_formats.checkpoint import load_model_config
from model_formats.gguf.convert import convert_gguf
from services.pb.cpumesh.v1 import shard_pb2
from shard_svc.kernels import choose_kernels
from shard_svc.model import ShardModel, make_batch
from shard_svc.quant import INT4
from shard_svc.sharding import plan_shard
from shard_svc.weights import load_shard_weights
from tests.service.test_shard_service import (
    NEW_TOKENS,
    ShardGroup,
    drive_greedy,
    shard_group,
)
from tests.unit.gguf_files import hf_model, write_gguf
from tests.unit.test_model import PROMPTS, gather_vocab, run_ranks

SHAPES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8)


def test_int4_shards_serve_a_gguf_at_its_own_precision(tmp_path: Path) -> None:
    model, weights = hf_model(tmp_path / "hf", "llama", **SHAPES)
    gguf = write_gguf(tmp_path / "m.gguf", "llama", model.config.to_dict(), weights, Q.Q4_1,
                      tensor_types={"model.embed_tokens.weight": Q.F32})
    linked = convert_gguf(gguf, tmp_path / "linked", link=True)
    expected = greedy_int4(linked, 2)
    with shard_group(linked, 2, tmp_path, extra=("--dtype", "int4", "--kernels", "aten")
                     ) as (services, addrs):
        group = ShardGroup(addrs)
        ours = drive_greedy(group)
        infos = group.call("Info", shard_pb2.ShardInfoRequest())
        group.close()
        logs = [s.log_tail(200) for s in services]
    assert all(i.dtype == "int4" for i in infos)
    assert all("Q4_1 -> int4 g32 (its own blocks)" in log for log in logs), logs[0]
    # --kernels aten on int4 weights in cpumesh's layout: cpumesh's int4 kernel (ATen's cannot
    # read it), the same kernel greedy_int4 multiplies with in process
    assert all("1 token: int4 kernel" in log for log in logs), logs[0]
    assert ours == expected


def greedy_int4(model_dir: Path, tp: int) -> list[list[int]]:
    """Greedy tokens of the int4 model in process (weight-only kernels), all prompts together."""
    config = load_model_config(model_dir)

    def rank(comm: Any) -> list[list[int]]:
        plan = plan_shard(config, comm.tp_rank, tp)
        weights = load_shard_weights(model_dir, config, plan, INT4)
        model = ShardModel(config, plan, weights, comm,
                           choose_kernels("aten", INT4, [x.gate_up for x in weights.layers]))
        cache = model.new_cache(capacity_tokens=512, page_size=8)
        steps = [(i, p) for i, p in enumerate(PROMPTS)]
        tokens: list[list[int]] = [[] for _ in PROMPTS]
        for _ in range(NEW_TOKENS):
            local = model.local_logits(model.forward(make_batch(steps, cache), cache))
            chosen = gather_vocab(comm, local, plan.vocab_range, config.vocab_size).argmax(-1)
            for i, t in enumerate(chosen.tolist()):
                tokens[i].append(t)
            steps = [(i, [t]) for i, t in enumerate(chosen.tolist())]
        return tokens

    return run_ranks(tp, rank)[0]
