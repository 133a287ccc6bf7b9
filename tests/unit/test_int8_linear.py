"""cpumesh's int8 kernel (shard_svc/csrc/int8_linear.cpp) against the product computed in
float64 on the same codes and scales: every activation dtype, rows of x in and out of its tiles
of 4, input widths that are no multiple of its vectors, products large enough to overflow 32-bit
sums; NaN kept to its row; bad shapes refused; the AVX2 build; the kernel plan's choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.errors import InvalidArgument
from shard_svc.kernels import check_library, choose_kernels
from shard_svc.quant import INT4, finish, quantize_int8
from shard_svc.quant_linear import INT8_KERNEL, int8_kernel, quant_linear

ROOT = Path(__file__).resolve().parents[2]
# relative to the largest output: the dtype's rounding of the output and the scales, plus x's
# rounding to int16 (2^-16 of the row's largest input)
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert int8_kernel(), "cpumesh's C++ kernels did not build here"


def case(dtype: torch.dtype, rows: int, n: int, k: int, seed: int = 0
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel's product, float64 product) of random x [rows, k] and int8 codes [n, k]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = finish(quantize_int8(torch.randn(n, k, generator=g)), dtype)
    want = x.double() @ (w.q.double() * w.scales.double()[:, None]).T
    got = quant_linear(x, w, None, INT8_KERNEL)
    assert got.dtype == dtype and got.shape == (rows, n)
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "k"), [(1, 64), (1, 100), (3, 200), (4, 576), (5, 2049),
                                         (9, 4160)])
def test_product_equals_float64(dtype: torch.dtype, rows: int, k: int) -> None:
    got, want = case(dtype, rows, 37, k)
    assert (got.double() - want).abs().max() <= TOL[dtype] * want.abs().max()


def test_large_products_do_not_overflow() -> None:
    """Inputs all at the row's maximum against codes all 127, 16384 wide: each output is
    16384 * 32767 * 127 in integers, past 2^31 (the kernel's 32-bit lanes are flushed into a
    64-bit total); a thread count changes no bit (integer sums)."""
    k = 16384
    w = finish(quantize_int8(torch.ones(8, k)), torch.float32)
    x = torch.full((2, k), 0.5)
    got = quant_linear(x, w, None, INT8_KERNEL)
    assert torch.allclose(got, torch.full((2, 8), 0.5 * k), rtol=1e-6)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(case(torch.bfloat16, 5, 301, 1000)[0])
        assert torch.equal(*outs)
    finally:
        torch.set_num_threads(before)


def test_nan_and_infinity_stay_in_their_row() -> None:
    w = finish(quantize_int8(torch.randn(16, 64)), torch.float32)
    x = torch.randn(3, 64)
    x[0, 5], x[2, 60] = float("nan"), float("inf")
    got = quant_linear(x, w, None, INT8_KERNEL)
    assert got[0].isnan().all() and got[2].isnan().all() and got[1].isfinite().all()


def test_bad_shapes_and_dtypes_are_refused() -> None:
    q = torch.zeros(4, 64, dtype=torch.int8)
    op = torch.ops.cpumesh_kernels.int8_linear
    with pytest.raises(RuntimeError, match="last dimension must be 64"):
        op(torch.zeros(1, 63), q, torch.ones(4))
    with pytest.raises(RuntimeError, match=r"s must be \[4\]"):
        op(torch.zeros(1, 64), q, torch.ones(5))
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(torch.zeros(1, 64), q, torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="q must be int8"):
        op(torch.zeros(1, 64), q.float(), torch.ones(4))


def test_the_plan_times_the_kernel_and_cpumesh_forces_it() -> None:
    weights = [finish(quantize_int8(torch.randn(256, 512)), torch.bfloat16) for _ in range(4)]
    auto = choose_kernels("auto", torch.bfloat16, weights)
    assert INT8_KERNEL in auto.timings_us and len(auto.timings_us[INT8_KERNEL]) == 3
    assert choose_kernels("cpumesh", torch.bfloat16, weights).libraries == (INT8_KERNEL,) * 3
    for dtype in (INT4, torch.bfloat16, torch.float32):
        with pytest.raises(InvalidArgument, match="'cpumesh' is cpumesh's int8 kernel"):
            check_library("cpumesh", dtype)


CHILD = """
import json, torch
from shard_svc import native
from tests.unit.test_int8_linear import case
isa = native.load()
errors = {}
for dtype in (torch.float32, torch.bfloat16):
    got, want = case(dtype, 5, 37, 2049)
    errors[str(dtype)] = ((got.double() - want).abs().max() / want.abs().max()).item()
print(json.dumps({"isa": isa, "errors": errors}))
"""


@pytest.mark.timeout(300)
def test_avx2_build() -> None:
    """The kernel as an AVX2-only CPU builds it (`vpmaddwd`, 16 inputs a vector), in a process
    with ATEN_CPU_CAPABILITY=avx2 (inductor's vector ISA follows it)."""
    env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["isa"] == "avx2"
    for dtype in (torch.float32, torch.bfloat16):
        assert result["errors"][str(dtype)] <= TOL[dtype]
