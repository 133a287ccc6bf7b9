"""The shard process and the IPEX backend. `python -m shard_svc --kernels ipex` where IPEX cannot
run: the process refuses before loading anything, exit status 1, with one line naming why and
what to install. With an IPEX that matches torch (here the fake of its API, tests/fake_ipex.py,
installed as the package), the default --kernels auto takes it, says so in one line, goes
through its calls and decodes transformers' greedy tokens. The shard serving with the real IPEX:
test_ipex_real.py (`make test-ipex`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from services.pb.cpumesh.v1 import shard_pb2_grpc
from shard_svc.ipex_detect import INSTALL, MODULE, installed_version
from tests.checkpoints import tiny_checkpoint
from tests.fake_ipex import OTHER, stand_in_package
from tests.procs import free_ports, running, wait_serving
from tests.service.test_kv_int8_service import PROMPT, STEPS, shard, teacher_forced

ROOT = Path(__file__).resolve().parents[2]


def run_shard(model_dir: Path, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    grpc_port, mesh_port = free_ports(2)
    return subprocess.run(
        [sys.executable, "-m", "shard_svc", "--model-dir", str(model_dir), "--kernels", "ipex",
         "--listen", f"127.0.0.1:{grpc_port}", "--peers", f"127.0.0.1:{mesh_port}"],
        env={**os.environ, **(env or {})}, cwd=ROOT, capture_output=True, text=True,
        timeout=120)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.mark.skipif(installed_version() is not None,
                    reason="IPEX is installed here: test_ipex_real.py serves with it")
def test_refused_where_ipex_is_not_installed(model_dir: Path) -> None:
    out = run_shard(model_dir)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"cpumesh shard: error: kernels 'ipex': {MODULE} is not installed; {INSTALL}"]


def test_refused_where_ipex_is_built_for_another_torch(model_dir: Path, tmp_path: Path) -> None:
    """An IPEX installed for another torch (its metadata says so) is never imported: importing
    this stand-in would exit with 127."""
    stand_in_package(tmp_path, OTHER, "raise SystemExit(127)\n")
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    out = run_shard(model_dir, {"PYTHONPATH": path})
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"cpumesh shard: error: kernels 'ipex': {MODULE} {OTHER} needs torch "
        f"{OTHER.rsplit('.', 1)[0]}, this is torch {torch.__version__}; {INSTALL}"]


FAKE_PACKAGE = """
import atexit, json, sys
from tests.fake_ipex import build
fake = build({version!r})
atexit.register(lambda: open({calls!r}, "w").write(json.dumps(sorted(set(fake.calls)))))
sys.modules[__name__] = fake
"""


@pytest.mark.timeout(300)
def test_auto_takes_a_matching_ipex(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    version, calls = torch.__version__.split("+")[0] + "+cpu", tmp_path / "calls.json"
    stand_in_package(tmp_path / "site", version.split("+")[0],
                     FAKE_PACKAGE.format(version=version, calls=str(calls)))
    path = os.pathsep.join([str(tmp_path / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    service, address = shard(model_dir, tmp_path, "fake-ipex")
    service.env["PYTHONPATH"] = path.rstrip(os.pathsep)
    with running([service]):
        wait_serving(address, service)
        with grpc.insecure_channel(address) as channel:
            ours = teacher_forced(shard_pb2_grpc.ShardServiceStub(channel), None)
    assert service.proc is not None and service.proc.returncode == 0
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        greedy = model.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False,
                                attention_mask=torch.ones(1, len(PROMPT), dtype=torch.int64))
    assert [t for t, _ in ours] == greedy[0, len(PROMPT):].tolist()
    lines = service.log_path.read_text().splitlines()
    backend = [line.split(": ", 1)[1] for line in lines if "kernel backend: " in line]
    assert len(backend) == 1 and backend[0].startswith(f"kernel backend: IPEX {version} on ")
    assert {"rms_norm", "rotary_embedding", "single_query_cached_kv_attention"} <= set(
        json.loads(calls.read_text()))
