"""The sharding plan alone: coverage, balance, replication and refusals."""

from __future__ import annotations

import itertools

import pytest

from services.config import ModelConfig
from shard_svc.sharding import local_kv_index, plan_shard, split_evenly


def config(q_heads: int, kv_heads: int, inter: int = 1536, vocab: int = 49152) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=q_heads * 64,
                       intermediate_size=inter, num_layers=2, num_heads=q_heads,
                       num_kv_heads=kv_heads, head_dim=64, max_position_embeddings=2048)


CASES = ([(9, 3, tp) for tp in range(1, 5)] + [(32, 8, tp) for tp in range(1, 17)]
         + [(64, 8, 4)] + [(14, 2, tp) for tp in range(1, 5)])


@pytest.mark.parametrize(("q_heads", "kv_heads", "tp"), CASES)
def test_plan_covers_every_head_once(q_heads: int, kv_heads: int, tp: int) -> None:
    cfg = config(q_heads, kv_heads)
    plans = [plan_shard(cfg, r, tp) for r in range(tp)]
    group = q_heads // kv_heads
    # Every query head on exactly one rank, in order.
    q_owned = [q for p in plans for q in range(*p.q_head_range)]
    assert q_owned == list(range(q_heads))
    for p in plans:
        assert p.num_q_heads >= 1 and p.num_kv_heads >= 1
        # Each local query head attends with the KV head it has in the full model.
        for q, local in zip(range(*p.q_head_range), local_kv_index(p, cfg), strict=True):
            assert p.kv_head_range[0] + local == q // group
    # KV heads: all covered; replicated only when tp exceeds their count.
    kv_owned = [h for p in plans for h in range(*p.kv_head_range)]
    assert sorted(set(kv_owned)) == list(range(kv_heads))
    assert (len(kv_owned) > kv_heads) == (tp > kv_heads)
    # Query heads per rank nearly equal while KV heads are split (not replicated).
    if tp <= kv_heads:
        sizes = [p.num_kv_heads for p in plans]
        assert max(sizes) - min(sizes) <= 1
    for attr, total in (("intermediate_range", cfg.intermediate_size),
                        ("vocab_range", cfg.vocab_size)):
        ranges = [getattr(p, attr) for p in plans]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1


def test_smollm2_tp2_splits_heads_six_and_three() -> None:
    cfg = config(9, 3)
    assert [plan_shard(cfg, r, 2).q_head_range for r in range(2)] == [(0, 6), (6, 9)]
    assert [plan_shard(cfg, r, 2).kv_head_range for r in range(2)] == [(0, 2), (2, 3)]


def test_replication_shares_a_kv_head() -> None:
    cfg = config(32, 8)
    plans = [plan_shard(cfg, r, 16) for r in range(16)]
    assert [p.kv_head_range for p in plans[:4]] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [p.q_head_range for p in plans[:4]] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # Uneven replication: 3 ranks over 2 KV heads of 7 query heads each.
    cfg = config(14, 2)
    assert [plan_shard(cfg, r, 3).q_head_range for r in range(3)] == [(0, 4), (4, 7), (7, 14)]


@pytest.mark.parametrize(("cfg", "tp_rank", "tp", "message"), [
    (config(9, 3), 0, 10, "tp_size 10 exceeds the 9 query heads"),
    (config(14, 2), 0, 15, "tp_size 15 exceeds the 14 query heads"),
    (config(9, 3), 0, 0, "tp_size must be >= 1, got 0"),
    (config(9, 3), 2, 2, "tp_rank must be in 0..1, got 2"),
    (config(9, 3), -1, 2, "tp_rank must be in 0..1, got -1"),
    (config(9, 3, inter=3), 0, 4, "tp_size 4 exceeds intermediate_size 3"),
    (config(9, 3, vocab=2), 0, 3, "tp_size 3 exceeds vocab_size 2"),
])
def test_refusals_name_the_numbers(cfg: ModelConfig, tp_rank: int, tp: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_shard(cfg, tp_rank, tp)


def test_split_evenly_brute_force() -> None:
    for n in range(0, 40):
        for parts in range(1, 12):
            ranges = [split_evenly(n, parts, i) for i in range(parts)]
            flat = [x for a, b in ranges for x in range(a, b)]
            assert flat == list(range(n))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
