"""`python -m shard_svc --kernels ipex` where IPEX cannot run: the process refuses before loading
anything, exit status 1, with one line naming why and what to install. The shard serving with the
real IPEX: test_ipex_real.py (`make test-ipex`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shard_svc.ipex_detect import INSTALL, MODULE, installed_version
from tests.checkpoints import tiny_checkpoint
from tests.fake_ipex import OTHER, stand_in_package
from tests.procs import free_ports

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
