"""The C++ kernels' vector ISA (shard_svc/native.py): inductor's own choice, remembered in the
kernel cache so that a shard that does not compile never imports inductor (~2.6 s, ~75 MB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shard_svc import native

ROOT = Path(__file__).resolve().parents[2]


def test_remembered_isa_is_inductors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    monkeypatch.setenv("CPUMESH_KERNEL_CACHE", str(tmp_path))
    isa = native.vector_isa()
    want = pick_vec_isa()
    assert isa.name == str(want) and isa.floats == want.nelements()
    assert isa.flags == [f"-D{m}" for m in want.build_macro()] + want.build_arch_flags().split()
    [saved] = tmp_path.glob("isa-*.json")
    assert json.loads(saved.read_text())["name"] == isa.name
    assert native.vector_isa() == isa  # read back
    saved.write_text("{not json")  # a damaged record is asked again and rewritten
    assert native.vector_isa() == isa and json.loads(saved.read_text())["name"] == isa.name
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # another process's setting:
    assert native.vector_isa().name == ""  # its own record (inductor: no vector ISA)
    assert len(list(tmp_path.glob("isa-*.json"))) == 2


def test_a_shard_process_loads_the_kernels_without_inductor() -> None:
    """Once remembered (here: by the test run's own build), loading the kernels in a fresh
    process imports no inductor."""
    assert native.load()
    code = ("import sys; from shard_svc import native; built = native.load(); "
            "print(built, 'torch._inductor' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "False" and done.stdout.split()[0] != "None"


def test_an_empty_cache_variable_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPUMESH_KERNEL_CACHE", "")
    assert native.build_root() == Path("~/.cache/cpumesh/kernels").expanduser()
