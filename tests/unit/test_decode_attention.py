"""The C++ decode attention (shard_svc/decode_attention.py) against attention computed in float64
from the same K, V and queries gathered by index: every dtype the cache holds, head sizes that
take 1 to 16 vectors, query groups split across the kernel's tiles of 4 heads, rows of 1 token
and of histories split into several chunks, slots scattered over the cache; built for this
CPU's vector ISA, and for AVX2 in a process that asks for it.

Tolerances: float32 1e-5 (float32 arithmetic); bfloat16 / float16 one rounding of the output
(8e-3 / 1e-3 on outputs of magnitude < 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shard_svc import decode_attention, native
from tests.avx2_child import run_avx2

ROOT = Path(__file__).resolve().parents[2]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
SHAPES = [(3, 64), (1, 16), (5, 128), (8, 80), (2, 32)]  # (G query heads per KV head, D)


@pytest.fixture(scope="module", autouse=True)
def built() -> str:
    isa = decode_attention.load(64)
    assert isa, "the decode attention kernel did not build on this machine (see the log)"
    return isa


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
              lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q K^T) V per row over its history, float64."""
    out = []
    for b in range(q.shape[0]):
        slots = index[b, :lengths[b]]
        ks, vs = k[:, slots].double(), v[:, slots].double()  # [Hkv, n, D]
        scores = torch.einsum("hgd,hnd->hgn", q[b].double(), ks) * scale
        out.append(torch.einsum("hgn,hnd->hgd", scores.softmax(-1), vs))
    return torch.stack(out)


def case(dtype: torch.dtype, group: int, dim: int, lengths: tuple[int, ...],
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, reference) for a cache of 2 KV heads x 3000 slots; slots past each row's length
    are -1, which the kernel must not read."""
    g = torch.Generator().manual_seed(seed)
    hkv, slots, rows, width = 2, 3000, len(lengths), max(lengths)
    k, v = (torch.randn(hkv, slots, dim, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(rows, hkv, group, dim, generator=g).to(dtype)
    index = torch.stack([torch.randperm(slots, generator=g)[:width] for _ in range(rows)])
    n = torch.tensor(lengths)
    index[torch.arange(width).view(1, -1) >= n.view(-1, 1)] = -1
    scale = dim ** -0.5
    got = decode_attention.decode_attention(q, k, v, index, n, scale)
    return got, reference(q, k, v, index, n, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("group", "dim"), SHAPES)
def test_matches_attention_over_the_gathered_history(dtype: torch.dtype, group: int,
                                                     dim: int) -> None:
    got, want = case(dtype, group, dim, (1, 700, 2100))
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.allclose(got.double(), want, rtol=0, atol=ATOL[dtype]), \
        (got.double() - want).abs().max().item()


def test_threads_do_not_change_the_result() -> None:
    """Chunks per row follow the thread count; their combination must not move the output
    beyond float32 rounding."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, want = case(torch.float32, 3, 64, (1500, 5))
        torch.set_num_threads(2)
        two, _ = case(torch.float32, 3, 64, (1500, 5))
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(one, two, rtol=0, atol=1e-6)
    assert torch.allclose(two.double(), want, rtol=0, atol=1e-5)


def test_refuses_what_it_cannot_read() -> None:
    k = v = torch.randn(2, 100, 64)
    q = torch.randn(1, 2, 3, 64)
    with pytest.raises(RuntimeError, match="outside the cache's 100 slots"):
        decode_attention.decode_attention(q, k, v, torch.tensor([[5, 100]]), torch.tensor([2]),
                                          0.125)
    with pytest.raises(RuntimeError, match="has length 0"):
        decode_attention.decode_attention(q, k, v, torch.tensor([[5, 6]]), torch.tensor([0]),
                                          0.125)
    with pytest.raises(RuntimeError, match="one dtype"):
        decode_attention.decode_attention(q.half(), k, v, torch.tensor([[5]]), torch.tensor([1]),
                                          0.125)
    assert not decode_attention.supports(72, 16) and decode_attention.supports(80, 16)


CHILD = """
import json, torch
from shard_svc import decode_attention, native
from tests.unit.test_decode_attention import case
isa = decode_attention.load(64)
errors = {}
for dtype in (torch.float32, torch.bfloat16):
    got, want = case(dtype, 3, 64, (1, 700, 2100))
    errors[str(dtype)] = (got.double() - want).abs().max().item()
print(json.dumps({"isa": isa, "errors": errors}))
"""


@pytest.mark.timeout(300)
def test_avx2_build() -> None:
    """The kernel as an AVX2-only CPU builds it (ATEN_CPU_CAPABILITY=avx2: inductor's vector ISA
    follows it), in a process of its own."""
    result = run_avx2(CHILD)
    assert result["isa"] == "avx2"
    assert result["errors"]["torch.float32"] < ATOL[torch.float32]
    assert result["errors"]["torch.bfloat16"] < ATOL[torch.bfloat16]


def test_builders_take_turns_with_a_deadline(tmp_path: Path) -> None:
    lock = tmp_path / "cpumesh.lock"
    with (native._exclusive(lock, 1.0), pytest.raises(TimeoutError, match="held"),
          native._exclusive(lock, 0.3)):
        pass
    with native._exclusive(lock, 0.3):  # released: free again
        pass


@pytest.mark.timeout(300)
def test_a_killed_builders_lock_file_does_not_block_the_next(built: str) -> None:
    """torch's extension builder waits without end while its lock file exists; a builder killed
    mid-build leaves it. The next load (here `make kernels`' command) removes it under its own
    (flock) lock."""
    stale = native.build_root() / native.extension_name(built) / "lock"
    stale.write_text("")
    done = subprocess.run([sys.executable, "-m", "shard_svc.native"], cwd=ROOT,
                          capture_output=True, text=True, timeout=280,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"C++ kernels: built for {built}"
    assert not stale.exists()
