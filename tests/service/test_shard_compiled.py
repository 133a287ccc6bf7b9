"""The shard process with `--compile decode`: `python -m shard_svc` compiles its decode buckets
before it says SERVING, logs how long (which `cpumesh local` shows), chooses plain kernels (the
weights are frozen into the graphs), decodes transformers' greedy tokens over gRPC, and never
falls back to an eager decode step or compiles while serving. `--compile decode --kernels
packed` is refused at start."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from services.pb.cpumesh.v1 import shard_pb2_grpc
from tests.checkpoints import tiny_checkpoint
from tests.procs import free_ports, running, wait_serving
from tests.service.test_kv_int8_service import PROMPT, STEPS, shard, teacher_forced
from tools.local_procs import PHASES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_compiled_shard_decodes_greedy_tokens(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = tiny_checkpoint(tmp_path / "model", "llama")
    service, address = shard(model_dir, tmp_path, "compiled", "--compile", "decode")
    with running([service]):
        wait_serving(address, service, deadline_s=500)
        with grpc.insecure_channel(address) as channel:
            ours = teacher_forced(shard_pb2_grpc.ShardServiceStub(channel), None)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        greedy = model.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False,
                                attention_mask=torch.ones(1, len(PROMPT), dtype=torch.int64))
    assert [t for t, _ in ours] == greedy[0, len(PROMPT):].tolist()
    log = service.log_path.read_text()
    assert re.search(r"compiled decode: buckets \(1, 8\) rows, 2 graphs, warm in [\d.]+ s", log)
    kernels = next(line for line in log.splitlines() if "kernels for float32" in line)
    assert "packed" not in kernels.split("(")[0], kernels
    assert "would recompile" not in log and "every step eager" not in log
    # what `cpumesh local` shows while the shard compiles (the last phase its log names)
    shown = [m.expand(text) for pattern, text in PHASES for m in pattern.finditer(log)]
    assert "compiling decode steps of 1 and 8 rows (about a minute each)" in shown
    assert re.fullmatch(r"compiled the 8-row decode step in [\d.]+ s", shown[-1]), shown


def test_compile_with_packed_kernels_refused(tmp_path: Path) -> None:
    grpc_port, mesh_port = free_ports(2)
    out = subprocess.run(
        [sys.executable, "-m", "shard_svc", "--model-dir", str(tmp_path), "--compile", "decode",
         "--kernels", "packed", "--listen", f"127.0.0.1:{grpc_port}",
         "--peers", f"127.0.0.1:{mesh_port}"],
        env=dict(os.environ), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "kernels 'packed' cannot go with it" in out.stderr, out.stderr
