"""`python -m shard_svc --kv-dtype int8 --kv-cache-mb 1` beside the same shard with a float32
cache of the same size: Info reports >= 3.5x the tokens, and the int8 shard's teacher-forced
top-1 follows the float one's."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from services.pb.cpumesh.v1 import shard_pb2, shard_pb2_grpc
from shard_svc.kv_store import kv_bytes_per_token
from tests.checkpoints import tiny_checkpoint
from tests.procs import Service, free_ports, running, wait_serving

PROMPT = [5, 17, 42, 7, 99, 250, 3, 8]
STEPS = 12


def shard(model_dir: Path, log_dir: Path, name: str, *flags: str) -> tuple[Service, str]:
    grpc_port, mesh_port = free_ports(2)
    address = f"127.0.0.1:{grpc_port}"
    return Service(name, ["-m", "shard_svc", "--model-dir", str(model_dir), "--peers",
                          f"127.0.0.1:{mesh_port}", "--listen", address, "--threads", "1",
                          "--kv-cache-mb", "1", "--kv-page-size", "8", *flags], log_dir), address


def teacher_forced(stub: shard_pb2_grpc.ShardServiceStub, forced: list[int] | None
                   ) -> list[tuple[int, float]]:
    """Prefill PROMPT, then decode step by step feeding `forced` (or the greedy choice):
    (top-1 id, its logit) per step."""
    step_id = stub.Info(shard_pb2.ShardInfoRequest(), timeout=10).next_step_id
    out: list[tuple[int, float]] = []
    for i in range(STEPS):
        if i == 0:
            request = shard_pb2.StepRequest(step_id=step_id, prefill=[
                shard_pb2.PrefillSeq(seq_id=1, token_ids=PROMPT, top_k=1)])
        else:
            token = forced[i - 1] if forced else out[-1][0]
            request = shard_pb2.StepRequest(step_id=step_id + i, extend=[
                shard_pb2.ExtendSeq(seq_id=1, token_id=token, top_k=1)])
        result = stub.Step(request, timeout=30).results[0]
        out.append((result.token_ids[0], result.logits[0]))
    return out


@pytest.mark.timeout(180)
def test_int8_kv_shard_reports_3_5x_the_tokens_and_follows_float(tmp_path: Path) -> None:
    model_dir = tiny_checkpoint(tmp_path / "model", "llama", head_dim=64,
                                num_attention_heads=4, num_key_value_heads=2)
    float_shard, float_addr = shard(model_dir, tmp_path, "float32")
    int8_shard, int8_addr = shard(model_dir, tmp_path, "int8", "--kv-dtype", "int8")
    with running([float_shard, int8_shard]):
        wait_serving(float_addr, float_shard)
        wait_serving(int8_addr, int8_shard)
        with grpc.insecure_channel(float_addr) as a, grpc.insecure_channel(int8_addr) as b:
            stubs = shard_pb2_grpc.ShardServiceStub(a), shard_pb2_grpc.ShardServiceStub(b)
            infos = [s.Info(shard_pb2.ShardInfoRequest(), timeout=10) for s in stubs]
            for info, dtype in zip(infos, ("float32", "int8"), strict=True):
                per_token = kv_bytes_per_token(2, 2, 64, getattr(torch, dtype))
                assert info.kv_capacity_tokens == 2**20 // (per_token * 8) * 8
                assert info.kv_free_tokens == info.kv_capacity_tokens
            assert infos[1].kv_capacity_tokens >= 3.5 * infos[0].kv_capacity_tokens  # 1920, 512
            reference = teacher_forced(stubs[0], None)
            got = teacher_forced(stubs[1], [t for t, _ in reference])
    assert [t for t, _ in got] == [t for t, _ in reference]
    for (_, x), (_, y) in zip(got, reference, strict=True):
        assert abs(x - y) <= 0.05 * abs(y)
    assert any(x != y for (_, x), (_, y) in zip(got, reference, strict=True))
