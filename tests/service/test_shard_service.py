"""Shard processes on loopback, driven through Step like a router would, against transformers."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from services.pb.cpumesh.v1 import shard_pb2, shard_pb2_grpc
from tests.checkpoints import tiny_checkpoint
from tests.procs import Service, free_ports, health_status, wait_serving

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROMPTS = [[5, 17, 42, 7, 99, 250, 3], [11], [200, 201, 202, 13], [64, 1, 2, 3, 4, 5, 6, 7, 8]]
START_STEP = [1, 1, 3, 6]  # sequences join the batch at different steps
NEW_TOKENS = 10


class ShardGroup:
    """Test driver: sends every request to all ranks at once and merges greedy top-1."""

    def __init__(self, addresses: list[str]) -> None:
        self.channels = [grpc.insecure_channel(a) for a in addresses]
        self.stubs = [shard_pb2_grpc.ShardServiceStub(c) for c in self.channels]

    def call(self, method: str, request: object, timeout: float = 30.0) -> list:
        futures = [getattr(s, method).future(request, timeout=timeout) for s in self.stubs]
        return [f.result() for f in futures]

    def step(self, request: shard_pb2.StepRequest) -> dict[int, int]:
        """Greedy token per sequence: the best top-1 over all shards (lowest id on ties)."""
        best: dict[int, tuple[float, int]] = {}
        for response in self.call("Step", request):
            assert response.step_id == request.step_id
            for r in response.results:
                cand = (r.logits[0], -r.token_ids[0])
                best[r.seq_id] = max(best.get(r.seq_id, cand), cand)
        return {seq: -neg_id for seq, (_, neg_id) in best.items()}

    def close(self) -> None:
        for c in self.channels:
            c.close()


@contextlib.contextmanager
def shard_group(model_dir: Path, tp: int, log_dir: Path, start: bool = True,
                extra: tuple[str, ...] = (), serving_deadline_s: float = 120.0
                ) -> Iterator[tuple[list[Service], list[str]]]:
    ports = free_ports(2 * tp)
    grpc_addrs = [f"127.0.0.1:{p}" for p in ports[:tp]]
    peers = ",".join(f"127.0.0.1:{p}" for p in ports[tp:])
    services = [Service(f"shard{r}", ["-m", "shard_svc", "--model-dir", str(model_dir),
                                      "--tp-size", str(tp), "--tp-rank", str(r), "--peers", peers,
                                      "--listen", grpc_addrs[r], "--threads", "1",
                                      "--kv-capacity-tokens", "512", "--kv-page-size", "8",
                                      "--mesh-timeout", "60", *extra], log_dir)
                for r in range(tp)]
    try:
        if start:
            for s in services:
                s.start()
            for s, a in zip(services, grpc_addrs, strict=True):
                wait_serving(a, s, serving_deadline_s)
        yield services, grpc_addrs
    finally:
        for s in services:
            s.stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS)
            out.append(gen[0, len(p):].tolist())
    return out


def drive_greedy(group: ShardGroup) -> list[list[int]]:
    """Sequences start at different steps, run together, and are released when done."""
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    step_id = group.call("Info", shard_pb2.ShardInfoRequest())[0].next_step_id
    step = 1
    while any(len(t) < NEW_TOKENS for t in tokens):
        prefill = [shard_pb2.PrefillSeq(seq_id=i, token_ids=p, top_k=1)
                   for i, p in enumerate(PROMPTS) if START_STEP[i] == step]
        extend = [shard_pb2.ExtendSeq(seq_id=i, token_id=t[-1], top_k=1)
                  for i, t in enumerate(tokens) if t and len(t) < NEW_TOKENS]
        if prefill or extend:
            chosen = group.step(shard_pb2.StepRequest(step_id=step_id, prefill=prefill,
                                                      extend=extend))
            step_id += 1
            for seq, tok in chosen.items():
                tokens[seq].append(tok)
            done = [i for i, t in enumerate(tokens) if len(t) == NEW_TOKENS]
            group.call("Release", shard_pb2.ReleaseRequest(seq_ids=done))
        step += 1
    return tokens


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_greedy_generation_equals_transformers(model_dir: Path, expected: list[list[int]],
                                               tp: int, tmp_path: Path) -> None:
    with shard_group(model_dir, tp, tmp_path) as (_, addrs):
        group = ShardGroup(addrs)
        assert drive_greedy(group) == expected
        infos = group.call("Info", shard_pb2.ShardInfoRequest())
        assert len({i.model_fingerprint for i in infos}) == 1
        assert [i.tp_rank for i in infos] == list(range(tp))
        assert all(i.kv_free_tokens == i.kv_capacity_tokens == 512 for i in infos)
        group.close()


def test_release_bad_steps_and_health(model_dir: Path, expected: list[list[int]],
                                      tmp_path: Path) -> None:
    with shard_group(model_dir, 2, tmp_path, start=False) as (services, addrs):
        # Rank 0 alone cannot form the mesh: alive, but not ready.
        services[0].start()
        for _ in range(50):
            if health_status(addrs[0], "liveness") == SERVING:
                break
            time.sleep(0.2)
        assert health_status(addrs[0], "liveness") == SERVING
        assert health_status(addrs[0]) == NOT_SERVING
        services[1].start()
        for s, a in zip(services, addrs, strict=True):
            wait_serving(a, s)
        group = ShardGroup(addrs)

        group.call("Step", shard_pb2.StepRequest(step_id=1, prefill=[
            shard_pb2.PrefillSeq(seq_id=0, token_ids=PROMPTS[0], top_k=1)]))
        free = [i.kv_free_tokens for i in group.call("Info", shard_pb2.ShardInfoRequest())]
        assert free == [512 - 8] * 2
        bad = [
            (grpc.StatusCode.NOT_FOUND, dict(step_id=2, extend=[
                shard_pb2.ExtendSeq(seq_id=9, token_id=1, top_k=1)])),
            (grpc.StatusCode.INVALID_ARGUMENT, dict(step_id=2, prefill=[
                shard_pb2.PrefillSeq(seq_id=0, token_ids=[1], top_k=1)])),
            (grpc.StatusCode.INVALID_ARGUMENT, dict(step_id=2, prefill=[
                shard_pb2.PrefillSeq(seq_id=1, token_ids=[1] * 513, top_k=1)])),
            (grpc.StatusCode.RESOURCE_EXHAUSTED, dict(step_id=2, prefill=[
                shard_pb2.PrefillSeq(seq_id=1, token_ids=[1] * 509, top_k=1)])),
            (grpc.StatusCode.FAILED_PRECONDITION, dict(step_id=7, extend=[
                shard_pb2.ExtendSeq(seq_id=0, token_id=1, top_k=1)])),
        ]
        for code, fields in bad:
            for stub in group.stubs:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Step(shard_pb2.StepRequest(**fields), timeout=10)
                assert err.value.code() == code, err.value.details()
        # Garbage bytes: INVALID_ARGUMENT, not UNKNOWN.
        raw = group.channels[0].unary_unary("/cpumesh.v1.ShardService/Step")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Nothing changed: release frees exactly the first sequence, then it all runs right.
        released = group.call("Release", shard_pb2.ReleaseRequest(seq_ids=[0, 42]))
        assert [r.freed_tokens for r in released] == [8, 8]
        assert [r.kv_free_tokens for r in released] == [512, 512]
        assert drive_greedy(group) == expected
        group.close()
        # SIGTERM: a graceful stop, exit code 0.
        for s in services:
            s.signal(signal.SIGTERM)
        assert [s.proc.wait(30) for s in services if s.proc] == [0, 0]
