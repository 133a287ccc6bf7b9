"""Eager and compiled decode side by side on one model (shard_svc/compiled_step.py), at any tp:
the same teacher-forced steps through two engines, each with its own KV cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PROMPTS = ([5, 17, 42, 7, 99, 250, 3], [11], [(7 * i) % 300 for i in range(70)])
STEPS = 5


def compilable_model(model_dir: Any, comm: Any, dtype: str, library: str = "auto") -> Any:
    """The rank's ShardModel with kernels as a shard with --compile decode and --kernels
    `library` chooses them."""
    import torch

    from model_formats.checkpoint import load_model_config
    from shard_svc.kernels import choose_kernels
    from shard_svc.model import ShardModel
    from shard_svc.sharding import plan_shard
    from shard_svc.weights import load_shard_weights

    config = load_model_config(model_dir)
    plan = plan_shard(config, comm.tp_rank, comm.tp_size)
    weights = load_shard_weights(model_dir, config, plan, getattr(torch, dtype))
    kernels = choose_kernels(library, weights.embed.dtype, [w.gate_up for w in weights.layers],
                             packing=False)
    return ShardModel(config, plan, weights, comm, kernels)


def side_by_side(model_dir: Any, comm: Any, dtype: str, buckets: tuple[int, ...],
                 kernel: bool = True, library: str = "auto") -> dict[str, Any]:
    """Decode 1 sequence, then 3 together (padded to a bucket of 4 rows; one history over 64
    tokens), feeding both engines the same tokens; return each step's top-5 (values, ids) of
    both, the graphs compiled after warm-up and at the end, the steps run compiled, the GEMM
    backends and decode attention it compiled with, and the names of the ops the compiled
    engine's decode steps ran (torch.profiler). kernel=False: gather + SDPA, not the C++
    decode attention; library: --kernels."""
    from torch.profiler import ProfilerActivity, profile

    from shard_svc.compiled_step import CompiledDecode
    from shard_svc.engine import SeqWork, ShardEngine

    model = compilable_model(model_dir, comm, dtype, library)
    config = model.config
    eager = ShardEngine(model, model.new_cache(1024, page_size=4))
    compiled = CompiledDecode(model, buckets=buckets)
    if not kernel:
        compiled.attention = None
    cache = model.new_cache(1024, page_size=4)
    compiled.warm_up(cache)
    warm_graphs = compiled.graphs
    engine = ShardEngine(model, cache, compiled=compiled)
    steps: list[tuple[Any, ...]] = []
    ops: set[str] = set()

    def step(work: list[SeqWork]) -> None:
        outs = [eager.step(eager.next_step_id, work).results]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            outs.append(engine.step(engine.next_step_id, work).results)
        if not work[0].prefill:
            ops.update(e.name for e in prof.events())
        steps.append(tuple(([r.logits for r in o], [r.token_ids for r in o]) for o in outs))

    for seqs in ([0], [1, 2, 3]):
        step([SeqWork(s, tuple(PROMPTS[s - 1 if s else 0]), True, top_k=5) for s in seqs])
        for t in range(STEPS):
            step([SeqWork(s, ((31 * t + 17 * s) % config.vocab_size,), False, top_k=5)
                  for s in seqs])
        for e in (eager, engine):
            e.release(seqs)
    return {"steps": steps, "warm_graphs": warm_graphs, "graphs": compiled.graphs,
            "compiled_steps": compiled.steps, "gemms": compiled.gemms,
            "attention": compiled.attention,
            "decode_ops": sorted(ops)}


def rank_side_by_side(report: Callable[..., None], tp_rank: int, mesh_ports: list[int],
                      points: dict[str, Any]) -> None:
    """`points`: dtype -> model directory."""
    import torch

    from shard_svc.mesh.group import MeshGroup
    from tests.mesh_ranks import mesh_config

    torch.set_num_threads(1)
    with MeshGroup(mesh_config(tp_rank, mesh_ports, recv_timeout_s=300.0)) as mesh:
        report("done", {d: side_by_side(m, mesh, d, (4,)) for d, m in points.items()})


def rank_side_by_side_alone(report: Callable[..., None], model_dir: Any, dtype: str) -> None:
    """side_by_side at tp 1 and 2 threads in this (spawned) process, which may have been given
    other ATEN_CPU_CAPABILITY than the tests'; reports it with inductor's vector ISA."""
    import torch
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    from shard_svc.mesh.communicator import SingleRank

    torch.set_num_threads(2)
    result = side_by_side(model_dir, SingleRank(), dtype, (1, 4))
    report("done", result | {"isa": str(pick_vec_isa())})
