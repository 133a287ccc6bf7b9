"""Shard processes: the real SmolLM2 at tp 2, a broken mesh and its recovery, and memory."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import grpc
import pytest
import torch

from services.pb.cpumesh.v1 import shard_pb2
from tests.procs import health_status, wait_serving
from tests.service.test_shard_service import NOT_SERVING, SERVING, ShardGroup, shard_group
from tests.unit.test_weights import write_big_checkpoint

SMOL_PROMPTS = ["The capital of France is", "def add(a, b):", "Ünïcödé and 東京 🍣:"]
SMOL_TOKENS = 12


def greedy(group: ShardGroup, prompts: list[list[int]], n: int) -> list[list[int]]:
    step_id = group.call("Info", shard_pb2.ShardInfoRequest())[0].next_step_id
    chosen = group.step(shard_pb2.StepRequest(step_id=step_id, prefill=[
        shard_pb2.PrefillSeq(seq_id=i, token_ids=p, top_k=1) for i, p in enumerate(prompts)]))
    tokens = [[chosen[i]] for i in range(len(prompts))]
    for _ in range(n - 1):
        step_id += 1
        chosen = group.step(shard_pb2.StepRequest(step_id=step_id, extend=[
            shard_pb2.ExtendSeq(seq_id=i, token_id=t[-1], top_k=1) for i, t in enumerate(tokens)]))
        for i, t in enumerate(tokens):
            t.append(chosen[i])
    group.call("Release", shard_pb2.ReleaseRequest(seq_ids=list(range(len(prompts)))))
    return tokens


def test_smollm2_tp2_processes_equal_transformers(smollm2_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = [tok(p).input_ids for p in SMOL_PROMPTS]
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=SMOL_TOKENS, min_new_tokens=SMOL_TOKENS)
            expected.append(out[0, len(p):].tolist())
    del model
    with shard_group(smollm2_dir, 2, tmp_path) as (_, addrs):
        group = ShardGroup(addrs)
        plans = [i.plan for i in group.call("Info", shard_pb2.ShardInfoRequest())]
        assert [(p.q_head_range.start, p.q_head_range.stop) for p in plans] == [(0, 6), (6, 9)]
        assert greedy(group, prompts, SMOL_TOKENS) == expected
        group.close()


def test_broken_mesh_is_unavailable_then_recovers(tmp_path: Path) -> None:
    from tests.checkpoints import tiny_checkpoint

    model_dir = tiny_checkpoint(tmp_path / "tiny", "qwen2")
    with shard_group(model_dir, 2, tmp_path) as (services, addrs):
        group = ShardGroup(addrs)
        before = greedy(group, [[1, 2, 3]], 4)
        services[1].signal(signal.SIGKILL)
        services[1].proc.wait(10)
        info = group.stubs[0].Info(shard_pb2.ShardInfoRequest(), timeout=5)
        step_id = info.next_step_id
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            group.stubs[0].Step(shard_pb2.StepRequest(step_id=step_id, prefill=[
                shard_pb2.PrefillSeq(seq_id=7, token_ids=[1, 2, 3], top_k=1)]), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert re.search(r"peer 1|rank 1", err.value.details()), err.value.details()
        assert time.monotonic() - t0 < 3
        assert health_status(addrs[0]) == NOT_SERVING
        assert health_status(addrs[0], "liveness") == SERVING
        # The peer comes back: the survivor re-forms without a restart and serves again.
        services[1].start()
        for s, a in zip(services, addrs, strict=True):
            wait_serving(a, s, deadline_s=60)
        group.call("Reset", shard_pb2.ResetRequest(next_step_id=1))
        assert greedy(group, [[1, 2, 3]], 4) == before
        group.close()


def test_shard_memory_at_tp2(tmp_path: Path) -> None:
    """Each shard of a ~1 GB checkpoint at tp 2: what loading adds to its peak RSS."""
    size = write_big_checkpoint(tmp_path / "big", layers=22)
    assert size > 1.0e9
    with shard_group(tmp_path / "big", 2, tmp_path) as (services, _):
        for s in services:
            s.signal(signal.SIGTERM)
            s.proc.wait(30)
        for s in services:
            m = re.search(r"memory: (\d+) MB before loading, (\d+) MB now, peak (\d+) MB "
                          r"\(KV cache (\d+) MB\)", s.log_path.read_text())
            assert m, s.log_tail()
            before, _, peak, kv = (int(x) for x in m.groups())
            size_mb = size / 2**20
            print(f"{s.name}: checkpoint {size_mb:.0f} MB, peak RSS {peak} MB "
                  f"({peak / size_mb:.2f}×), before loading {before} MB, added "
                  f"{peak - before} MB ({(peak - before) / size_mb:.2f}×), KV cache {kv} MB")
            assert peak - before < 0.6 * size_mb
