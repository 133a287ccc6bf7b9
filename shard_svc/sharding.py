"""The sharding plan: which slice of every layer a tensor-parallel rank owns.

A pure function `plan_shard(config, tp_rank, tp_size) -> ShardPlan` of index ranges, tested alone.

* Attention is split by KV-head group: a KV head and its query heads stay on one rank. With
  tp_size <= num_kv_heads the KV heads are split into contiguous, nearly equal ranges (uneven is
  fine: 3 KV heads at tp 2 give 2 + 1, i.e. 6 + 3 query heads for SmolLM2). With more ranks than
  KV heads, the ranks are split into nearly equal runs, one run per KV head; every rank of a run
  holds (replicates) that KV head and a contiguous share of its query heads.
* The MLP intermediate dimension and the vocabulary are split into contiguous, nearly equal ranges.

All `*_range` values are (start, stop) with stop exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.config import ModelConfig

Range = tuple[int, int]


def split_evenly(n: int, parts: int, index: int) -> Range:
    """The `index`-th of `parts` contiguous ranges covering 0..n, sizes differing by at most one.

    The first n % parts ranges are one longer.
    """
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class ShardPlan:
    tp_rank: int
    tp_size: int
    q_head_range: Range
    kv_head_range: Range
    intermediate_range: Range
    vocab_range: Range

    @property
    def num_q_heads(self) -> int:
        return self.q_head_range[1] - self.q_head_range[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_head_range[1] - self.kv_head_range[0]


def local_kv_index(plan: ShardPlan, config: ModelConfig) -> list[int]:
    """For each local query head, which local KV head it attends with."""
    group = config.group_size
    return [q // group - plan.kv_head_range[0] for q in range(*plan.q_head_range)]


def plan_shard(config: ModelConfig, tp_rank: int, tp_size: int) -> ShardPlan:
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in 0..{tp_size - 1}, got {tp_rank}")
    if tp_size > config.num_heads:
        raise ValueError(
            f"tp_size {tp_size} exceeds the {config.num_heads} query heads: "
            "every rank needs at least one query head"
        )
    for name, size in (("intermediate_size", config.intermediate_size),
                       ("vocab_size", config.vocab_size)):
        if tp_size > size:
            raise ValueError(f"tp_size {tp_size} exceeds {name} {size}")

    group = config.group_size
    n_kv = config.num_kv_heads
    if tp_size <= n_kv:
        kv_range = split_evenly(n_kv, tp_size, tp_rank)
        q_range = (kv_range[0] * group, kv_range[1] * group)
    else:
        # Ranks split into one run per KV head; find this rank's run and its place in it.
        kv = next(h for h in range(n_kv) if tp_rank < split_evenly(tp_size, n_kv, h)[1])
        run_start, run_stop = split_evenly(tp_size, n_kv, kv)
        run_len = run_stop - run_start
        # Nearly equal runs have at most ceil(tp/n_kv) <= ceil(heads/n_kv) = group ranks.
        assert run_len <= group, (tp_size, config.num_heads, n_kv)
        q_start, q_stop = split_evenly(group, run_len, tp_rank - run_start)
        kv_range = (kv, kv + 1)
        q_range = (kv * group + q_start, kv * group + q_stop)

    return ShardPlan(
        tp_rank=tp_rank,
        tp_size=tp_size,
        q_head_range=q_range,
        kv_head_range=kv_range,
        intermediate_range=split_evenly(config.intermediate_size, tp_size, tp_rank),
        vocab_range=split_evenly(config.vocab_size, tp_size, tp_rank),
    )
