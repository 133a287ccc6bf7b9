"""The KV cache: consecutive pages read as views, scattered ones gathered with the same result,
reservations all-or-nothing and undone exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from model_formats.checkpoint import load_model_config
from services.errors import ResourceExhausted
from shard_svc.kv_cache import KVCache
from shard_svc.mesh.communicator import SingleRank
from shard_svc.model import ShardModel, make_batch
from shard_svc.sharding import plan_shard
from shard_svc.weights import load_shard_weights
from tests.checkpoints import tiny_checkpoint


def cache(pages: int = 16, page_size: int = 4) -> KVCache:
    return KVCache(num_layers=2, num_kv_heads=2, head_dim=8, capacity_tokens=pages * page_size,
                   page_size=page_size)


def fill(c: KVCache, seq_id: int, n: int) -> None:
    """Extend a sequence by n tokens and write each token's slot number into its K and V."""
    slots = c.reserve([(seq_id, [seq_id] * n)]).writes[0]
    for layer in range(2):
        k, v = c.layer(layer)
        k[:, slots] = slots.view(1, -1, 1).float()
        v[:, slots] = -slots.view(1, -1, 1).float()


def expected(c: KVCache, seq_id: int) -> torch.Tensor:
    return c.slots(seq_id, 0, c.length(seq_id)).float().view(1, -1, 1).expand(2, -1, 8)


def test_growing_sequences_keep_consecutive_pages_and_read_views() -> None:
    c = cache()
    fill(c, 1, 5)
    fill(c, 2, 3)  # starts inside the free run, leaving 1 room to grow
    for _ in range(6):  # both grow a token at a time, interleaved
        fill(c, 1, 1)
        fill(c, 2, 1)
    for seq_id in (1, 2):
        k, v = c.history(1, seq_id)
        assert k.data_ptr() >= c.k.data_ptr() and k._base is not None  # a view, no copy
        assert torch.equal(k, expected(c, seq_id)) and torch.equal(v, -expected(c, seq_id))


def test_scattered_pages_are_gathered_in_order() -> None:
    c = cache(pages=8)
    for seq_id in range(8):
        fill(c, seq_id, 4)  # every page taken, one per sequence
    owner = {int(c.slots(s, 0, 1)) // 4: s for s in range(8)}
    for page in (1, 3, 6):
        c.release(owner[page])
    fill(c, 10, 12)  # three pages, not consecutive
    slots = c.slots(10, 0, 12)
    assert sorted(set((slots // 4).tolist())) == [1, 3, 6]
    k, v = c.history(0, 10)
    assert torch.equal(k, expected(c, 10)) and torch.equal(v, -expected(c, 10))


def test_reservation_is_all_or_nothing_and_undone_exactly() -> None:
    c = cache(pages=4)
    fill(c, 1, 6)
    free = c.free_tokens
    with pytest.raises(ResourceExhausted, match="KV cache full"):
        c.reserve([(1, [1] * 3), (2, [2] * 9)])
    assert c.free_tokens == free and c.seq_ids() == [1] and c.length(1) == 6
    r = c.reserve([(1, [1] * 2), (2, [2] * 5)])
    assert c.length(1) == 8 and c.length(2) == 5 and c.free_tokens == 0
    r.undo()
    assert c.free_tokens == free and c.seq_ids() == [1] and c.length(1) == 6
    assert torch.equal(c.history(0, 1)[0], expected(c, 1))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


def test_model_output_is_the_same_from_scattered_pages(model_dir: Path) -> None:
    """Logits of a sequence whose pages are scattered equal those of one whose pages are not."""
    config = load_model_config(model_dir)
    plan = plan_shard(config, 0, 1)
    model = ShardModel(config, plan, load_shard_weights(model_dir, config, plan), SingleRank())
    prompt = list(range(3, 40))

    def run(c: KVCache) -> list[torch.Tensor]:
        steps = [(100, prompt)]
        out = []
        for _ in range(6):
            out.append(model.local_logits(model.forward(make_batch(steps, c), c)))
            steps = [(100, [int(out[-1].argmax())])]
        return out

    plain = run(model.new_cache(256, page_size=4))
    scattered = model.new_cache(256, page_size=4)
    for seq_id in range(64):
        make_batch([(seq_id, [1, 2, 3, 4])], scattered)
    for seq_id in range(0, 64, 2):
        scattered.release(seq_id)
    got = run(scattered)
    slots = scattered.slots(100, 0, scattered.length(100))
    assert not torch.equal(slots.diff(), torch.ones_like(slots.diff()))  # really scattered
    for a, b in zip(plain, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_decode_attention_paths_agree(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode batch attends by the C++ kernel reading the cache in place; without it, as one
    padded batch when short, per sequence (views) when long: the same logits every way."""
    import shard_svc.model

    config = load_model_config(model_dir)
    plan = plan_shard(config, 0, 1)
    model = ShardModel(config, plan, load_shard_weights(model_dir, config, plan), SingleRank())
    kernel_op = model.slot_decode
    assert kernel_op is not None, "the C++ decode attention did not build here"
    calls: list[int] = []

    def counted(*args: Any) -> torch.Tensor:
        calls.append(1)
        return kernel_op(*args)

    model.slot_decode = counted
    prompts = [list(range(3, 20)), [7], list(range(50, 90))]

    def run() -> list[torch.Tensor]:
        c = model.new_cache(512, page_size=4)
        steps = [(i, p) for i, p in enumerate(prompts)]
        out = []
        for _ in range(5):
            batch = make_batch(steps, c)
            out.append(model.local_logits(model.forward(batch, c)))
            steps = [(i, [int(t)]) for i, t in enumerate(out[-1].argmax(-1))]
        assert (batch.padding_mask is None) == (shard_svc.model.PADDED_MAX_SLOTS == 0)
        return out

    kernel = run()
    assert len(calls) == 4 * config.num_layers  # every decode step, every layer
    model.slot_decode = None
    padded = run()
    monkeypatch.setattr(shard_svc.model, "PADDED_MAX_SLOTS", 0)
    for a, b, c in zip(kernel, padded, run(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5)
