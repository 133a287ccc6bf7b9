"""The shard's prefix cache: full blocks shared by reference, chained keys, the last token always
computed, released blocks kept until evicted; and a step that reuses a prefix gives the logits
of one that computes it all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_formats.checkpoint import load_model_config
from shard_svc.engine import SeqWork, ShardEngine, StepOutput
from shard_svc.kv_cache import KVCache
from shard_svc.mesh.communicator import SingleRank
from shard_svc.model import ShardModel
from shard_svc.sharding import plan_shard
from shard_svc.weights import load_shard_weights
from tests.checkpoints import tiny_checkpoint


def cache(pages: int = 8, page_size: int = 4) -> KVCache:
    return KVCache(num_layers=1, num_kv_heads=1, head_dim=2, capacity_tokens=pages * page_size,
                   page_size=page_size)


def run(c: KVCache, seq_id: int, tokens: list[int]) -> int:
    """A prefill that ran: its blocks keyed. Returns the tokens found cached."""
    r = c.reserve([(seq_id, tokens)])
    r.commit()
    return r.cached[0]


def pages_of(c: KVCache, seq_id: int) -> list[int]:
    return sorted(set((c.slots(seq_id, 0, c.length(seq_id)) // c.page_size).tolist()))


def test_full_blocks_are_shared_and_the_last_token_is_computed() -> None:
    c = cache()
    assert run(c, 1, list(range(10))) == 0
    assert run(c, 2, [*range(8), 50, 51]) == 8  # two full blocks reused
    assert pages_of(c, 2)[:2] == pages_of(c, 1)[:2]
    assert run(c, 3, list(range(8))) == 4  # all 8 cached, but its last token is computed
    assert run(c, 4, [99, *range(1, 10)]) == 0  # another first block: nothing after it matches
    assert c.free_tokens == 32 - 4 * (3 + 1 + 1 + 3)  # pages held: 3, 1 + 1 own, 2 + 1 own, 3


def test_released_blocks_stay_cached_until_a_page_is_needed() -> None:
    c = cache(pages=6)
    run(c, 1, list(range(12)))  # three full blocks
    c.release(1)
    assert c.free_tokens == c.capacity_tokens  # kept, but counted as free
    assert run(c, 2, [*range(12), 7]) == 12  # all three reused after the release
    c.release(2)
    run(c, 3, [100 + t for t in range(20)])  # 5 of 6 pages: 2 of the 3 cached are evicted
    assert c.free_tokens == 4
    c.release(3)
    assert run(c, 4, [*range(12), 7]) == 4  # the tail went first: the first block is left
    c.release(4)
    assert c.free_tokens == c.capacity_tokens
    c.reset()
    assert run(c, 5, [100 + t for t in range(20)]) == 0  # reset forgot every block


def test_an_undone_step_keys_nothing_and_frees_its_pages() -> None:
    c = cache()
    run(c, 1, list(range(8)))
    free = c.free_tokens
    c.reserve([(2, [*range(8), 9])]).undo()  # reused blocks 0 and 1, then the step failed
    assert c.free_tokens == free and 2 not in c
    c.reserve([(3, list(range(30, 40)))]).undo()
    assert run(c, 4, [*range(30, 40), 1]) == 0  # the failed step's blocks were never keyed


def test_without_prefix_caching_nothing_is_shared() -> None:
    c = KVCache(num_layers=1, num_kv_heads=1, head_dim=2, capacity_tokens=32, page_size=4,
                prefix_cache=False)
    run(c, 1, list(range(10)))
    assert run(c, 2, list(range(10))) == 0
    c.release(1)
    c.release(2)
    assert c.free_tokens == 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama", max_position_embeddings=128)


def engine(model_dir: Path, prefix_cache: bool, capacity: int) -> ShardEngine:
    config = load_model_config(model_dir)
    plan = plan_shard(config, 0, 1)
    model = ShardModel(config, plan, load_shard_weights(model_dir, config, plan), SingleRank())
    return ShardEngine(model, model.new_cache(capacity, page_size=4, prefix_cache=prefix_cache))


def test_steps_with_cached_prefixes_give_the_logits_of_cold_ones(model_dir: Path) -> None:
    """A shared system prompt, a multi-turn chat (its first turn's answer in the second turn's
    prompt), a one-token prefill beside a decode: the same top-k with and without reuse."""
    system = list(range(3, 26))  # 23 tokens: 5 full blocks of 4
    script: list[list[SeqWork]] = []
    for seq_id in range(1, 5):  # each: the system prompt and its own question
        question = [30 + 5 * seq_id + i for i in range(seq_id)]
        script.append([SeqWork(seq_id, (*system, *question), True, top_k=4)])
    turn_one = (*system, 61, 62)
    script.append([SeqWork(9, turn_one, True, top_k=4)])
    script.append([SeqWork(9, (63,), False, top_k=4), SeqWork(10, system[:4], True, top_k=4)])
    script += [[SeqWork(9, (t,), False, top_k=4)] for t in (64, 65)]  # its 7th block is full
    script.append([SeqWork(11, (*turn_one, 63, 64, 65, 66, 67), True, top_k=4)])  # 2nd turn
    # All 7 blocks cached, its last token computed: a one-token span, like the decode beside it.
    script.append([SeqWork(12, (*turn_one, 63, 64, 65, 66), True, top_k=4),
                   SeqWork(9, (66,), False, top_k=4)])

    def play(e: ShardEngine) -> list[StepOutput]:
        outs = []
        for step in script:
            outs.append(e.step(e.next_step_id, step))
            for w in step:
                if w.seq_id < 9:  # the first four end after their prefill
                    e.release([w.seq_id])
        return outs

    cold = play(engine(model_dir, prefix_cache=False, capacity=128))
    warm_engine = engine(model_dir, prefix_cache=True, capacity=128)
    warm = play(warm_engine)
    cached = [r.cached_tokens for out in warm for r in out.results]
    assert cached == [0, 20, 20, 20, 20, 0, 0, 0, 0, 28, 28, 0]  # whole blocks, never the last
    assert all(r.cached_tokens == 0 for out in cold for r in out.results)
    for a, b in zip(cold, warm, strict=True):
        for ra, rb in zip(a.results, b.results, strict=True):
            assert ra.token_ids == rb.token_ids
            torch.testing.assert_close(torch.tensor(ra.logits), torch.tensor(rb.logits),
                                       rtol=1e-4, atol=1e-4)
    warm_engine.release([9, 10, 11, 12])
    assert warm_engine.cache.free_tokens == warm_engine.cache.capacity_tokens
