"""cpumesh's int8 kernel (shard_svc/csrc/int8_linear.cpp) against the product computed in
float64 on the same codes and scales: every activation dtype, rows of x in and out of its tiles
of 4, input widths that are no multiple of its vectors, products large enough to overflow 32-bit
sums; NaN kept to its row; bad shapes refused; the AVX2 build; the kernel plan's choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.errors import InvalidArgument
from shard_svc.kernels import check_library, choose_kernels, embedding_rows
from shard_svc.quant import INT4, Int8Weight, block_int8, finish, quantize_int8
from shard_svc.quant_linear import DEQUANTIZE, INT8_KERNEL, int8_kernel, quant_linear
from tests.avx2_child import run_avx2

# relative to the largest output: the dtype's rounding of the output and the scales, plus x's
# rounding to int16 (2^-16 of the row's largest input)
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert int8_kernel(), "cpumesh's C++ kernels did not build here"


def case(dtype: torch.dtype, rows: int, n: int, k: int, seed: int = 0, blocked: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel's product, float64 product) of random x [rows, k] and int8 codes [n, k], the
    codes as rows or blocked (block_int8)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = finish(quantize_int8(torch.randn(n, k, generator=g)), dtype)
    want = x.double() @ (w.q.double() * w.scales.double()[:, None]).T
    if blocked:
        w = block_int8(w)
        assert w.blocked and w.shape == (n, k)
    got = quant_linear(x, w, None, INT8_KERNEL)
    assert got.dtype == dtype and got.shape == (rows, n)
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "k"), [(1, 64), (1, 100), (3, 200), (4, 576), (5, 2049),
                                         (9, 4160)])
def test_product_equals_float64(dtype: torch.dtype, rows: int, k: int) -> None:
    got, want = case(dtype, rows, 37, k)
    assert (got.double() - want).abs().max() <= TOL[dtype] * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "k"), [(1, 2), (1, 102), (2, 576), (3, 1026), (6, 4160)])
def test_blocked_product_equals_float64(dtype: torch.dtype, rows: int, k: int) -> None:
    """Blocked codes: 16 rows a block, inputs in pairs; odd pair counts, rows of x past a tile
    of 4, a long row's several 512-input partial sums."""
    got, want = case(dtype, rows, 48, k, blocked=True)
    assert (got.double() - want).abs().max() <= TOL[dtype] * want.abs().max()


def test_blocked_layout_reads_back_as_rows() -> None:
    """The blocked layout's rows, the lookup of a blocked table, the dequantize method on it;
    shapes it cannot take stay as rows."""
    w = finish(quantize_int8(torch.randn(64, 40)), torch.float32)
    b = block_int8(w)
    assert torch.equal(b.rows(16, 48), w.q[16:48]) and torch.equal(b.rows(0, 64), w.q)
    tokens = torch.tensor([0, 17, 63, 5])
    assert torch.equal(embedding_rows(tokens, b), embedding_rows(tokens, w))
    x = torch.randn(3, 40)
    want = quant_linear(x, w, None, DEQUANTIZE)
    assert torch.allclose(quant_linear(x, b, None, DEQUANTIZE), want)
    for shape in ((40, 64), (64, 41)):  # rows not in 16s, an odd width
        odd = finish(quantize_int8(torch.randn(*shape)), torch.float32)
        assert not block_int8(odd).blocked
    assert isinstance(b, Int8Weight) and block_int8(b) is b


def test_large_products_do_not_overflow() -> None:
    """Inputs all at the row's maximum against codes all 127, 16384 wide: each output is
    16384 * 32767 * 127 in integers, past 2^31 (the kernel's 32-bit lanes are flushed into a
    wider total), in both layouts; a thread count changes no bit."""
    k = 16384
    w = finish(quantize_int8(torch.ones(16, k)), torch.float32)
    x = torch.full((2, k), 0.5)
    for codes in (w, block_int8(w)):
        got = quant_linear(x, codes, None, INT8_KERNEL)
        assert torch.allclose(got, torch.full((2, 16), 0.5 * k), rtol=1e-6)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(case(torch.bfloat16, 5, 301, 1000)[0])
            outs.append(case(torch.bfloat16, 5, 304, 1000, blocked=True)[0])
        assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    finally:
        torch.set_num_threads(before)


def test_nan_and_infinity_stay_in_their_row() -> None:
    w = finish(quantize_int8(torch.randn(16, 64)), torch.float32)
    x = torch.randn(3, 64)
    x[0, 5], x[2, 60] = float("nan"), float("inf")
    for codes in (w, block_int8(w)):
        got = quant_linear(x, codes, None, INT8_KERNEL)
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
    blocked = torch.ops.cpumesh_kernels.int8_linear_blocked
    with pytest.raises(RuntimeError, match=r"q must be \[N / 16, K / 2, 16, 2\]"):
        blocked(torch.zeros(1, 64), q, torch.ones(4))
    with pytest.raises(RuntimeError, match="last dimension must be 64"):
        blocked(torch.zeros(1, 62), torch.zeros(1, 32, 16, 2, dtype=torch.int8), torch.ones(16))


def test_the_plan_times_the_kernel_and_cpumesh_forces_it() -> None:
    weights = [finish(quantize_int8(torch.randn(256, 512)), torch.bfloat16) for _ in range(4)]
    auto = choose_kernels("auto", torch.bfloat16, weights)  # ATen's weight-only: not a candidate
    assert set(auto.timings_us) == {INT8_KERNEL, DEQUANTIZE}
    assert all(len(t) == 3 for t in auto.timings_us.values())
    assert choose_kernels("cpumesh", torch.bfloat16, weights).libraries == (INT8_KERNEL,) * 3
    check_library("cpumesh", INT4)  # cpumesh's int4 kernel (tests/unit/test_int4_linear.py)
    for dtype in (torch.bfloat16, torch.float32):
        with pytest.raises(InvalidArgument, match="'cpumesh' is cpumesh's int8 / int4 kernel"):
            check_library("cpumesh", dtype)


CHILD = """
import json, torch
from shard_svc import native
from tests.unit.test_int8_linear import case
isa = native.load()
errors = {}
for dtype in (torch.float32, torch.bfloat16):
    for blocked in (False, True):
        got, want = case(dtype, 5, 48, 2050, blocked=blocked)
        errors[f"{dtype} {blocked}"] = ((got.double() - want).abs().max() / want.abs().max()).item()
print(json.dumps({"isa": isa, "errors": errors}))
"""


@pytest.mark.timeout(300)
def test_avx2_build() -> None:
    """The kernel as an AVX2-only CPU builds it (`vpmaddwd`, 16 inputs a vector; a block in two
    vectors of 8 rows), in a process with ATEN_CPU_CAPABILITY=avx2 (inductor's vector ISA
    follows it)."""
    result = run_avx2(CHILD)
    assert result["isa"] == "avx2"
    for dtype in (torch.float32, torch.bfloat16):
        for blocked in (False, True):
            assert result["errors"][f"{dtype} {blocked}"] <= TOL[dtype]


def test_weights_prepared_twice_keep_each_ranks_lm_head(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The shard prepares its weights again for its warm-up twin: blocking must leave blocked
    weights as they are. Once it re-sliced rank 1's tied LM head out of the blocked table (its
    offset read in blocks, not rows), and tp-2 int8 served garbage. int8 per row (what a shard
    serves where int8 in groups is not built); int8 in groups below."""
    import shard_svc.weights
    from model_formats.checkpoint import load_model_config
    from shard_svc.sharding import plan_shard
    from shard_svc.weights import load_shard_weights
    from tests.checkpoints import tiny_checkpoint

    monkeypatch.setattr(shard_svc.weights, "int8_group_kernel", lambda: False)
    # vocabulary 512: rank 1's rows start at 256, 16 blocks in, which the old code took as row 16
    model_dir = tiny_checkpoint(tmp_path, "llama", vocab_size=512, intermediate_size=192,
                                tie_word_embeddings=True)
    config = load_model_config(model_dir)
    plan = plan_shard(config, 1, 2)
    w = load_shard_weights(model_dir, config, plan, torch.int8)
    assert isinstance(w.lm_head, Int8Weight) and isinstance(w.embed, Int8Weight)
    head = w.lm_head.q.clone()  # rows 256..511 of the embedding
    assert torch.equal(head, w.embed.q[256:])
    kernels = choose_kernels("cpumesh", torch.bfloat16, [w.layers[0].gate_up])
    for _ in range(2):
        w = kernels.prepare(w)
        assert w.lm_head.blocked and w.embed.blocked
        assert torch.equal(w.lm_head.rows(0, 256), head)
