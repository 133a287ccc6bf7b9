"""What the mesh test ranks run (in processes spawned by tests.mesh_procs): allreduce matrices,
failure loops, formation, and greedy decoding through the sliced model. Each `rank_*` function
takes `report(kind, payload=None)` first, then its rank and arguments.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

SIZES = (1, 7, 576, 4096, 65536, 4 * 1024 * 1024)


def mesh_config(tp_rank: int, ports: list[int], **overrides: Any) -> Any:
    from shard_svc.mesh.group import MeshConfig

    fields: dict[str, Any] = dict(
        fingerprint="test-model/plan", mesh_name="test", form_timeout_s=60.0,
        recv_timeout_s=20.0, heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0)
    fields.update(overrides)
    return MeshConfig(tp_rank, len(ports), tuple(f"127.0.0.1:{p}" for p in ports), **fields)


def partials(numel: int, tp_size: int, dtype: Any, seed: int) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + numel)
    return [torch.randn(numel, generator=g).to(dtype) for _ in range(tp_size)]


def digest(t: Any) -> str:
    return hashlib.sha256(t.view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()


class Reference:
    """Each rank's partials for (numel, dtype), the float64 sum, its rounding bound, and the
    rank-order sum, computed once per process and reused for every mesh."""

    def __init__(self, tp_size: int) -> None:
        self.tp_size = tp_size
        self.cache: dict[tuple[int, Any], tuple[list[Any], Any, Any, Any]] = {}

    def get(self, numel: int, dtype: Any) -> tuple[list[Any], Any, Any, Any]:
        import torch

        from shard_svc.mesh.communicator import sum_in_rank_order

        key = (numel, dtype)
        if key not in self.cache:
            parts = partials(numel, self.tp_size, dtype, seed=1)
            exact = torch.zeros(numel, dtype=torch.float64)
            bound = torch.zeros(numel, dtype=torch.float64)
            for p in parts:
                exact += p.double()
                bound += p.double().abs()
            bound *= self.tp_size * 2.0 ** -23
            if dtype == torch.bfloat16:
                bound += exact.abs() * 2.0 ** -8
            self.cache[key] = (parts, exact, bound, sum_in_rank_order(parts))
        return self.cache[key]

    def check(self, result: Any, numel: int, dtype: Any) -> tuple[bool, bool, float]:
        """(within rounding of the float64 sum, bitwise equal to sum_in_rank_order, max error)"""
        import torch

        _, exact, bound, rank_order = self.get(numel, dtype)
        err = (result.double() - exact).abs()
        return bool((err <= bound).all()), bool(torch.equal(result, rank_order)), \
            float(err.max()) if numel else 0.0


def rank_matrix(report: Callable[..., None], tp_rank: int, meshes: list[tuple[str, list[int],
                dict[str, Any]]], sizes: tuple[int, ...]) -> None:
    """For each mesh (label, ports, overrides): allreduce every size in both dtypes; report
    {(label, transport, numel, dtype): (within rounding, equals rank order, max error, digest)}.
    """
    import torch

    from shard_svc.mesh.group import MeshGroup

    out = {}
    ref = Reference(len(meshes[0][1]))
    for label, mesh_ports, overrides in meshes:
        with MeshGroup(mesh_config(tp_rank, mesh_ports, **overrides)) as mesh:
            for numel in sizes:
                for dtype in (torch.float32, torch.bfloat16):
                    t = ref.get(numel, dtype)[0][tp_rank].clone()
                    assert mesh.all_reduce(t) is t
                    out[(label, mesh.transport, numel, str(dtype))] = (
                        *ref.check(t, numel, dtype), digest(t))
    report("done", out)


def rank_loop(report: Callable[..., None], tp_rank: int, mesh_ports: list[int],
              overrides: dict[str, Any], rounds: int) -> None:
    """Form and verify; then `rounds` times: allreduce in a loop until the mesh fails, report
    the failure, re-form and verify. A restarted rank passes rounds=0."""
    import torch

    from shard_svc.mesh.communicator import MeshError
    from shard_svc.mesh.group import MeshGroup

    mesh = MeshGroup(mesh_config(tp_rank, mesh_ports, **overrides))

    def verify() -> None:
        for seed in range(20):
            parts = partials(4096, mesh.tp_size, torch.float32, seed)
            t = mesh.all_reduce(parts[tp_rank].clone())
            assert torch.allclose(t.double(), sum(p.double() for p in parts), atol=1e-5), \
                "wrong sum"
        report("verified", mesh.transport)

    verify()
    for _ in range(rounds):
        t = torch.ones(576)
        count = 0
        try:
            while True:
                mesh.all_reduce(t.fill_(1.0))
                assert float(t[0]) == mesh.tp_size and float(t[-1]) == mesh.tp_size
                count += 1
                if count == 100:
                    report("looping")
        except MeshError as e:
            report("failed", (time.monotonic(), e.peer, str(e)))
        try:
            mesh.all_reduce(t)
        except MeshError as e:
            report("broken", str(e))
        mesh.reform()
        verify()
    report("finished")
    mesh.close()


def rank_idle(report: Callable[..., None], tp_rank: int, mesh_ports: list[int],
              overrides: dict[str, Any]) -> None:
    """Rank 0 allreduces; the others form and then never call all_reduce."""
    import torch

    from shard_svc.mesh.communicator import MeshError
    from shard_svc.mesh.group import MeshGroup

    mesh = MeshGroup(mesh_config(tp_rank, mesh_ports, **overrides))
    report("formed")
    if tp_rank == 0:
        start = time.monotonic()
        try:
            mesh.all_reduce(torch.ones(10))
        except MeshError as e:
            report("failed", (time.monotonic() - start, e.peer, str(e)))
    else:
        time.sleep(30)


def rank_form(report: Callable[..., None], tp_rank: int, mesh_ports: list[int],
              overrides: dict[str, Any]) -> None:
    """Form (or fail to); report "formed" and run one allreduce, or report "refused"."""
    import torch

    from shard_svc.mesh.communicator import MeshError
    from shard_svc.mesh.group import MeshGroup

    report("starting")
    try:
        mesh = MeshGroup(mesh_config(tp_rank, mesh_ports, **overrides))
    except MeshError as e:
        report("refused", (e.peer, str(e)))
        return
    report("formed")
    t = mesh.all_reduce(torch.full((8,), float(tp_rank + 1)))
    report("sum", t.tolist())
    mesh.close()


def with_overrides(config: Any, **changes: Any) -> Any:
    return replace(config, **changes)


PROMPTS = ([5, 17, 42, 7, 99, 250, 3], [11], [200, 201, 202, 13], [64, 1, 2, 3, 4, 5, 6, 7, 8])


def greedy(model_dir: Any, comm: Any, new_tokens: int) -> tuple[list[Any], list[str]]:
    """Greedy-decode PROMPTS together through the sliced model on `comm`; return each step's
    local logits [B, V] and a digest of its final hidden states (computed on every rank)."""
    import torch

    from model_formats.checkpoint import load_model_config
    from shard_svc.model import ShardModel, make_batch
    from shard_svc.sharding import plan_shard
    from shard_svc.weights import load_shard_weights

    config = load_model_config(model_dir)
    plan = plan_shard(config, comm.tp_rank, comm.tp_size)
    model = ShardModel(config, plan, load_shard_weights(model_dir, config, plan), comm)
    cache = model.new_cache(capacity_tokens=1024, page_size=4)
    steps = [(i, p) for i, p in enumerate(PROMPTS)]
    for i, _ in steps:
        cache.add(i)
    logits, hidden_digests = [], []
    for _ in range(new_tokens + 1):
        hidden = model.forward(make_batch(steps, cache), cache)  # [B, H]
        hidden_digests.append(digest(hidden.contiguous()))
        local = model.local_logits(hidden)  # [B, V]
        logits.append(local)
        full = torch.zeros(local.shape[0], config.vocab_size)  # every rank needs the argmax
        full[:, plan.vocab_range[0]:plan.vocab_range[1]] = local
        steps = [(i, [int(t)]) for i, t in enumerate(comm.all_reduce(full).argmax(-1))]
    return logits, hidden_digests


def rank_model(report: Callable[..., None], tp_rank: int, mesh_ports: list[int],
               model_dir: Any, new_tokens: int, overrides: dict[str, Any]) -> None:
    from shard_svc.mesh.group import MeshGroup

    with MeshGroup(mesh_config(tp_rank, mesh_ports, **overrides)) as mesh:
        logits, hidden = greedy(model_dir, mesh, new_tokens)
        # numpy, not tensors: torch would pass tensors as shared memory that dies with us
        report("done", ([x.numpy() for x in logits], hidden, mesh.transport))


def rank_aborting(report: Callable[..., None], tp_rank: int, mesh_ports: list[int],
                  overrides: dict[str, Any], culprit: int) -> None:
    """Form and verify as `rank_loop` does; let the peers block in their next collective,
    waiting for us; then do what a rank does whose collective failed on `culprit`: ABORT naming
    it, and re-form at once (closing every socket and data connection); verify, finish."""
    import torch

    from shard_svc.mesh.communicator import MeshError
    from shard_svc.mesh.group import MeshGroup

    mesh = MeshGroup(mesh_config(tp_rank, mesh_ports, **overrides))

    def verify() -> None:
        for seed in range(20):
            parts = partials(4096, mesh.tp_size, torch.float32, seed)
            t = mesh.all_reduce(parts[tp_rank].clone())
            assert torch.allclose(t.double(), sum(p.double() for p in parts), atol=1e-5)
        report("verified", mesh.transport)

    verify()
    time.sleep(0.5)  # the peers are in their next all_reduce, waiting for our data
    mesh._fail(MeshError(f"rank {tp_rank}: rank {culprit} sent nonsense", culprit))
    mesh.reform()
    verify()
    report("finished")
    mesh.close()
