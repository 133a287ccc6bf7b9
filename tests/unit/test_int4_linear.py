"""cpumesh's int4 kernel (shard_svc/csrc/group_linear.cpp) and its blocked layout: the product
against float64 on the same codes, scales and offsets, with x rounded to int16 per row as the
kernel documents, and against the float product; the layout read back by `dequantize_rows` as
the codes; groups of 32 to 128; rows of x in and out of its tiles of 4; NaN kept to its row; bad
shapes refused; the AVX2 build; the kernel plan's choice."""

from __future__ import annotations

import pytest
import torch

from shard_svc.kernels import choose_kernels
from shard_svc.quant import INT4, Int4Weight, block_int4, finish, quantize_int4
from shard_svc.quant_linear import DEQUANTIZE, INT4_KERNEL, WEIGHT_ONLY, int4_kernel, quant_linear
from tests.avx2_child import avx2_case_errors

# relative to the largest output: the output's and the scales' rounding in the dtype (the
# emulation below rounds x exactly as the kernel does)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert int4_kernel(), "cpumesh's C++ kernels did not build here"


def reference(x: torch.Tensor, so: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """float64: x rounded to int16 per row (nearest, one scale per row), times the codes `q`
    [N, K] with a blocked weight's own scales and offsets `so` [N / 16, K / 32, 2, 16] (the
    layout of both group kernels)."""
    m, k = x.shape
    n = q.shape[0]
    amax = x.double().abs().amax(-1, keepdim=True)
    xq = torch.round(x.double() * (32767 / amax)) * (amax / 32767)
    s, o = (so.double()[:, :, i].permute(0, 2, 1).reshape(n, k // 32, 1) for i in (0, 1))
    return xq.view(m, k) @ (q.double().view(n, k // 32, 32) * s + o).view(n, k).T


def case(dtype: torch.dtype, rows: int, n: int, k: int, group: int = 32, seed: int = 0
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kernel's product, its float64 emulation, the float64 product with unrounded x)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    codes = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group)
    w = block_int4(codes, dtype)
    assert w.blocked and w.shape == (n, k) and w.dtype == dtype
    got = quant_linear(x, w, None, INT4_KERNEL)
    assert got.dtype == dtype and got.shape == (rows, n)
    return got, reference(x, w.scale_zeros, codes.q), x.double() @ codes.dequantize().double().T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "n", "k", "group"), [(1, 16, 32, 32), (1, 48, 576, 32),
                                                       (3, 64, 256, 64), (4, 32, 1536, 128),
                                                       (9, 48, 2048, 32)])
def test_product_equals_float64(dtype: torch.dtype, rows: int, n: int, k: int, group: int
                                ) -> None:
    got, want, exact = case(dtype, rows, n, k, group)
    assert (got.double() - want).abs().max() <= TOL[dtype] * want.abs().max()
    # x's rounding to int16 (2^-16 of the row's largest input) on top: as the int8 kernel's
    assert (got.double() - exact).abs().max() <= max(2 * TOL[dtype], 1e-4) * exact.abs().max()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_layout_holds_the_codes(group: int) -> None:
    """Dequantizing the blocked layout gives (q - 8) * s + z of the codes; chunks of 16 rows
    too (the dequantize method expands a chunk at a time)."""
    codes = quantize_int4(torch.randn(64, 256) * 0.05, group)
    w = block_int4(codes, torch.float32)
    out = torch.empty(64, 256)
    assert torch.allclose(w.dequantize_rows(0, 64, out), codes.dequantize(), atol=1e-6)
    assert torch.allclose(w.dequantize_rows(16, 48, out), codes.dequantize()[16:48], atol=1e-6)
    x = torch.randn(2, 256)
    assert torch.allclose(quant_linear(x, w, None, DEQUANTIZE), x @ codes.dequantize().T,
                          atol=1e-4)


def test_nan_stays_in_its_row() -> None:
    codes = quantize_int4(torch.randn(32, 128) * 0.05)
    w = block_int4(codes, torch.float32)
    x = torch.randn(3, 128)
    x[1, 70] = float("nan")
    y = quant_linear(x, w, None, INT4_KERNEL)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


def test_bad_shapes_refused() -> None:
    op = torch.ops.cpumesh_kernels.int4_linear_blocked
    q = torch.zeros(2, 4, 4, 2, 16, 2, dtype=torch.uint8)
    s = torch.ones(2, 4, 2, 16)
    with pytest.raises(RuntimeError, match="last dimension must be 128"):
        op(torch.zeros(1, 100), q, s)
    with pytest.raises(RuntimeError, match="must be uint8"):
        op(torch.zeros(1, 128), q.to(torch.int8), s)
    with pytest.raises(RuntimeError, match="s must be"):
        op(torch.zeros(1, 128), q, torch.ones(2, 4, 16))
    with pytest.raises(RuntimeError, match="in x's dtype or float16"):
        op(torch.zeros(1, 128), q, s.bfloat16())


def test_weights_take_the_layout_and_the_plan_times_the_kernel() -> None:
    """Where the kernel builds, int4 weights are finished in its layout; the plan times it
    against dequantize (ATen's weight-only int4 kernel cannot read the layout), and `cpumesh` and
    `aten` both mean the kernel for them."""
    weights = [finish(quantize_int4(torch.randn(256, 512)), torch.bfloat16, True)
               for _ in range(4)]
    assert all(isinstance(w, Int4Weight) and w.blocked for w in weights)
    aten_layout = finish(quantize_int4(torch.randn(256, 512)), torch.bfloat16)
    assert isinstance(aten_layout, Int4Weight) and not aten_layout.blocked
    auto = choose_kernels("auto", torch.bfloat16, weights)
    assert set(auto.timings_us) == {INT4_KERNEL, DEQUANTIZE}
    assert all(len(t) == 3 for t in auto.timings_us.values())
    for library in ("cpumesh", "aten"):
        assert choose_kernels(library, INT4, weights).libraries == (INT4_KERNEL,) * 3
    assert choose_kernels("onednn", INT4, weights).libraries == (DEQUANTIZE,) * 3
    x = torch.randn(1, 512).bfloat16()
    assert torch.equal(quant_linear(x, weights[0], None, WEIGHT_ONLY),
                       quant_linear(x, weights[0], None, INT4_KERNEL))


@pytest.mark.timeout(300)
def test_avx2_build() -> None:
    """The kernel as an AVX2-only CPU builds it (`vpmaddubsw` + `vpmaddwd`, a block's 16 rows
    in two vectors of 8), in a process with ATEN_CPU_CAPABILITY=avx2."""
    result = avx2_case_errors("tests.unit.test_int4_linear")
    assert result["isa"] == "avx2"
    for dtype in (torch.float32, torch.bfloat16):
        assert result["errors"][str(dtype)] <= TOL[dtype]
