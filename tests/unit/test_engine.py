"""The shard engine alone: refusals change nothing, release frees, steps agree with the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_formats.checkpoint import load_model_config
from services.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from shard_svc.engine import SeqWork, ShardEngine
from shard_svc.mesh.communicator import MeshError, SingleRank
from shard_svc.model import ShardModel, make_batch
from shard_svc.sharding import plan_shard
from shard_svc.weights import load_shard_weights
from tests.checkpoints import tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama", max_position_embeddings=64)


def make_engine(model_dir: Path, capacity: int = 64) -> ShardEngine:
    config = load_model_config(model_dir)
    plan = plan_shard(config, 0, 1)
    model = ShardModel(config, plan, load_shard_weights(model_dir, config, plan), SingleRank())
    return ShardEngine(model, model.new_cache(capacity, page_size=8))


def greedy(engine: ShardEngine, prompt: list[int], n: int, seq_id: int = 1) -> list[int]:
    out = engine.step(engine.next_step_id, [SeqWork(seq_id, tuple(prompt), True)])
    tokens = [out.results[0].token_ids[0]]
    for _ in range(n - 1):
        out = engine.step(engine.next_step_id, [SeqWork(seq_id, (tokens[-1],), False)])
        tokens.append(out.results[0].token_ids[0])
    return tokens


def test_top_k_and_logsumexp_match_full_logits(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    out = engine.step(1, [SeqWork(7, (1, 2, 3), True, top_k=5)])
    r = out.results[0]
    engine.reset()
    engine.cache.add(7)
    logits = engine.model.local_logits(
        engine.model.forward(make_batch([(7, (1, 2, 3))], engine.cache), engine.cache))[0]
    values, ids = torch.topk(logits, 5)
    assert r.token_ids == tuple(ids.tolist())
    assert r.logits == pytest.approx(values.tolist(), abs=1e-6)
    assert r.logsumexp == pytest.approx(float(torch.logsumexp(logits, 0)), abs=1e-5)
    assert out.compute_s > 0 and out.allreduce_s >= 0


def test_bad_steps_get_their_error_and_change_nothing(model_dir: Path) -> None:
    engine = make_engine(model_dir, capacity=64)
    expected = greedy(make_engine(model_dir), [5, 6, 7], 6)
    engine.step(1, [SeqWork(1, (5, 6, 7), True)])
    free = engine.cache.free_tokens
    bad = [
        (FailedPrecondition, 5, [SeqWork(1, (9,), False)], "out of order: expected 2"),
        (NotFound, 2, [SeqWork(99, (9,), False)], "unknown sequence 99"),
        (InvalidArgument, 2, [SeqWork(1, (1, 2), True)], "already exists"),
        (InvalidArgument, 2, [SeqWork(2, (), True)], "has no tokens"),
        (InvalidArgument, 2, [SeqWork(2, (1,) * 65, True)], "beyond the model's context of 64"),
        (InvalidArgument, 2, [SeqWork(2, (301,), True)], "token id 301 outside"),
        (InvalidArgument, 2, [SeqWork(2, (3,), True, top_k=0)], "top_k must be in"),
        (InvalidArgument, 2, [SeqWork(2, (3,), True), SeqWork(2, (4,), True)], "appears twice"),
        (ResourceExhausted, 2, [SeqWork(2, (1,) * 60, True)], "KV cache full"),
        # A good sequence beside a bad one: the whole step is refused, the good one untouched.
        (NotFound, 2, [SeqWork(3, (4,), True), SeqWork(98, (1,), False)], "unknown sequence 98"),
    ]
    for error, step_id, work, message in bad:
        with pytest.raises(error, match=message):
            engine.step(step_id, work)
        assert engine.cache.free_tokens == free and engine.cache.seq_ids() == [1]
        assert engine.next_step_id == 2
    # The shard keeps serving correctly: the sequence continues exactly as a fresh run does.
    tokens = [expected[0]]
    for _ in range(5):
        out = engine.step(engine.next_step_id, [SeqWork(1, (tokens[-1],), False)])
        tokens.append(out.results[0].token_ids[0])
    assert tokens == expected


def test_release_returns_kv_and_is_idempotent(model_dir: Path) -> None:
    engine = make_engine(model_dir, capacity=64)
    engine.step(1, [SeqWork(1, (1,) * 9, True), SeqWork(2, (2,) * 3, True)])
    assert engine.cache.free_tokens == 64 - 16 - 8
    assert engine.release([1]) == 16
    assert engine.release([1, 42]) == 0
    assert engine.cache.free_tokens == 64 - 8
    engine.reset(next_step_id=10)
    assert engine.cache.free_tokens == 64 and engine.next_step_id == 10


class BrokenMesh(SingleRank):
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        raise MeshError("peer 1 (127.0.0.1:5001) stopped answering", peer=1)


def test_mesh_failure_is_unavailable_and_rolled_back(model_dir: Path) -> None:
    engine = make_engine(model_dir, capacity=64)
    engine.step(1, [SeqWork(1, (5, 6, 7), True)])
    real = engine.model.comm.inner
    engine.model.comm.inner = BrokenMesh()
    with pytest.raises(Unavailable, match="peer 1"):
        engine.step(2, [SeqWork(1, (8,), False), SeqWork(2, (1, 2), True)])
    assert engine.cache.seq_ids() == [1] and engine.cache.length(1) == 3
    engine.model.comm.inner = real
    assert engine.step(2, [SeqWork(1, (8,), False)]).step_id == 2


def test_logsumexp_at_temperature(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    out = engine.step(1, [SeqWork(1, (4, 5), True, top_k=3, temperature=0.5),
                          SeqWork(2, (4, 5), True, top_k=3, temperature=0.0)])
    engine.reset()
    engine.cache.add(1)
    logits = engine.model.local_logits(
        engine.model.forward(make_batch([(1, (4, 5))], engine.cache), engine.cache))[0]
    hot, greedy = out.results
    assert hot.logsumexp_t == pytest.approx(float(torch.logsumexp(logits / 0.5, 0)), abs=1e-5)
    assert greedy.logsumexp_t == greedy.logsumexp == pytest.approx(hot.logsumexp, abs=1e-6)
    with pytest.raises(InvalidArgument, match="temperature must be >= 0"):
        engine.step(engine.next_step_id, [SeqWork(3, (1,), True, temperature=float("nan"))])
