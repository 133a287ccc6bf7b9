"""A paused shard (SIGSTOP for 10 s, then SIGCONT): the group notices, goes NOT_SERVING, re-forms
by itself and serves the same greedy tokens, with no process restarted (issue 16, item 1)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest

from services.pb.cpumesh.v1 import shard_pb2
from tests.checkpoints import tiny_checkpoint
from tests.procs import health_status
from tests.service.test_shard_recovery import greedy
from tests.service.test_shard_service import NOT_SERVING, ShardGroup, shard_group

PAUSE_S = 10.0
HEAL_S = 15.0  # after SIGCONT, the group serves again within this
PROMPT = [[1, 2, 3], [250, 7]]
RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def step_all(group: ShardGroup, request: shard_pb2.StepRequest, timeout: float) -> None:
    """Like the router: Step on every rank; the first failure cancels the others and raises."""
    futures = [s.Step.future(request, timeout=timeout) for s in group.stubs]
    try:
        for f in futures:
            f.result()
    finally:
        for f in futures:
            f.cancel()


def serve_again(group: ShardGroup, deadline: float) -> list[list[int]]:
    """Like the router after a failure: Reset every rank, then decode; retry until it works."""
    while True:
        try:
            group.call("Reset", shard_pb2.ResetRequest(next_step_id=1), timeout=2)
            return greedy(group, PROMPT, 5)
        except grpc.RpcError as e:
            if e.code() not in RETRY or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_for(predicate: object, deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < end, f"not {what} within {deadline_s}s"
        time.sleep(0.1)


def test_paused_rank_rejoins_and_the_group_serves_again(tmp_path: Path) -> None:
    model_dir = tiny_checkpoint(tmp_path / "tiny", "qwen2")
    with shard_group(model_dir, 2, tmp_path) as (services, addrs):
        group = ShardGroup(addrs)
        pids = [s.proc.pid for s in services if s.proc is not None]
        before = greedy(group, PROMPT, 5)
        services[1].signal(signal.SIGSTOP)
        paused = time.monotonic()
        try:
            # A step in flight, as the router sends them: rank 0 gives up on rank 1 (heartbeats).
            step_id = group.stubs[0].Info(shard_pb2.ShardInfoRequest(), timeout=5).next_step_id
            with pytest.raises(grpc.RpcError) as err:
                step_all(group, shard_pb2.StepRequest(step_id=step_id, prefill=[
                    shard_pb2.PrefillSeq(seq_id=9, token_ids=[4, 5, 6], top_k=1)]), timeout=8)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            assert "rank 1" in err.value.details()
            wait_for(lambda: health_status(addrs[0]) == NOT_SERVING, 5, "rank 0 NOT_SERVING")
            time.sleep(max(0.0, paused + PAUSE_S - time.monotonic()))
        finally:
            services[1].signal(signal.SIGCONT)
        resumed = time.monotonic()
        after = serve_again(group, resumed + HEAL_S)
        healed_s = time.monotonic() - resumed
        assert after == before
        assert [s.proc.pid for s in services if s.proc is not None] == pids
        assert all(s.proc is not None and s.proc.poll() is None for s in services)
        # Rank 1 was not stepping when it resumed: it noticed the broken mesh by itself.
        log1 = services[1].log_path.read_text()
        assert "mesh broken" in log1 and "mesh re-formed" in log1, services[1].log_tail()
        print(f"paused {resumed - paused:.1f} s; serving again {healed_s:.1f} s after SIGCONT")
        group.close()


def test_idle_group_heals_after_a_pause_with_no_step_in_flight(tmp_path: Path) -> None:
    """No step runs during the pause: rank 0 must notice the silent peer between steps."""
    model_dir = tiny_checkpoint(tmp_path / "tiny", "llama")
    with shard_group(model_dir, 2, tmp_path) as (services, addrs):
        group = ShardGroup(addrs)
        before = greedy(group, PROMPT, 5)
        services[1].signal(signal.SIGSTOP)
        try:
            wait_for(lambda: health_status(addrs[0]) == NOT_SERVING, 5, "rank 0 NOT_SERVING")
            time.sleep(3)
        finally:
            services[1].signal(signal.SIGCONT)
        assert serve_again(group, time.monotonic() + HEAL_S) == before
        group.close()
