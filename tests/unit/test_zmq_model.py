"""The sliced model at tp 2 and 3 over MeshGroup, one process per rank: hidden states bitwise
equal on every rank, logits equal to tp 1 within 1e-5 (float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard_svc.mesh.communicator import SingleRank
from tests.checkpoints import tiny_checkpoint
from tests.mesh_procs import ports, ranks
from tests.mesh_ranks import greedy, rank_model

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[torch.Tensor]]:
    path = tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")
    logits, _ = greedy(path, SingleRank(), NEW_TOKENS)
    return path, logits


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("tp_size", "transport"), [(2, "tcp"), (3, "tcp"), (3, "shm")])
def test_tp_over_zmq_mesh_matches_tp1(checkpoint: tuple[Path, list[torch.Tensor]],
                                      tp_size: int, transport: str) -> None:
    path, reference = checkpoint
    mesh_ports = ports(tp_size)
    with ranks() as r:
        for rank in range(tp_size):
            r.start(f"rank{rank}", rank_model, rank, mesh_ports, path, NEW_TOKENS,
                    {"transport": transport})
        results = [r.wait(f"rank{rank}", "done", 110) for rank in range(tp_size)]
    assert all(res[2] == transport for res in results)
    hidden = [res[1] for res in results]
    assert all(h == hidden[0] for h in hidden), "hidden states differ between ranks"
    for step, ref in enumerate(reference):
        full = torch.cat([torch.from_numpy(res[0][step]) for res in results], dim=-1)  # [B, V]
        diff = (full - ref).abs().max().item()
        assert diff <= 1e-5, f"step {step}: max abs logit difference to tp 1 is {diff}"
