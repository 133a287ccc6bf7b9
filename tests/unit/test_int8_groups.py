"""int8 in groups of 32 (shard_svc/quant_groups.py) and cpumesh's group kernel
(shard_svc/csrc/group_linear.cpp): the codes against a numpy reference, the product against
float64 on the same codes with x rounded to int16 per row as the kernel documents, the layout
read back (rows, chunks, embedding rows), NaN kept to its row, bad shapes refused, GGUF Q8_0
taken exactly, what `--dtype int8` loads, the plan's choice, the AVX2 build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shard_svc.kernels import choose_kernels
from shard_svc.quant_groups import (
    Int8GroupCodes,
    Int8GroupWeight,
    block_int8_groups,
    quantize_int8_groups,
)
from shard_svc.quant_linear import (
    DEQUANTIZE,
    INT8_KERNEL,
    WEIGHT_ONLY,
    int8_group_kernel,
    quant_linear,
)
from tests.avx2_child import avx2_case_errors
from tests.unit.test_int4_linear import reference

# relative to the largest output: the output's rounding in the dtype (the emulation rounds x
# exactly as the kernel does; scales and offsets are float16 in every case)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert int8_group_kernel(), "cpumesh's C++ kernels did not build here"


def test_codes_match_numpy_and_error_is_half_a_step() -> None:
    w = (torch.randn(32, 256) + torch.linspace(-1, 1, 256)) * torch.rand(32, 1)
    codes = quantize_int8_groups(w)
    g = w.double().numpy().reshape(32, 8, 32)
    lo = g.min(-1).astype(np.float16).astype(np.float64)  # float16, as stored
    s = ((g.max(-1) - lo) / 255).astype(np.float16).astype(np.float64)
    q = np.clip(np.rint((g - lo[..., None]) / s[..., None]), 0, 255)
    assert np.array_equal(codes.offsets.numpy(), lo) and np.array_equal(codes.scales.numpy(), s)
    assert (codes.q.numpy().reshape(32, 8, 32) != q).mean() < 1e-3  # float32 ties only
    step = codes.scales.repeat_interleave(32, dim=1)
    # half a step, and the top code's clamp where the float16 scale rounded down
    assert ((codes.dequantize() - w).abs() <= step * 0.5 + 2e-3 * w.abs().amax()).all()


def q8_0_like(n: int, k: int, g: torch.Generator) -> Int8GroupCodes:
    """Codes as GGUF Q8_0 gives them: every offset -128 times its float16 scale."""
    q = torch.randint(1, 256, (n, k), generator=g, dtype=torch.uint8)
    d = (torch.rand(n, k // 32, generator=g) * 1e-3 + 1e-4).half().float()
    return Int8GroupCodes(q, d, -128 * d)


def explicit(w: Int8GroupWeight) -> Int8GroupWeight:
    """`w` with its derived offsets (scales alone) written out: the two-part layout."""
    assert w.so.shape[2] == 1
    return Int8GroupWeight(w.q, torch.cat((w.so, w.so * -128), dim=2).contiguous(), w.dtype)


def case(dtype: torch.dtype, rows: int, n: int, k: int, seed: int = 0, derived: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kernel's product, its float64 emulation, the float64 product with unrounded x);
    `derived`: Q8_0's codes, in the layout of scales alone."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    codes = (q8_0_like(n, k, g) if derived
             else quantize_int8_groups(torch.randn(n, k, generator=g) * 0.05 + 0.01))
    w = block_int8_groups(codes, dtype)
    assert w.shape == (n, k) and w.dtype == dtype and w.so.dtype == torch.float16
    assert w.so.shape[2] == (1 if derived else 2)
    got = quant_linear(x, w, None, INT8_KERNEL)
    assert got.dtype == dtype and got.shape == (rows, n)
    so = explicit(w).so if derived else w.so
    return got, reference(x, so, codes.q), x.double() @ codes.dequantize().double().T


AVX2_VARIANTS = ({}, {"derived": True})  # the AVX2 children's cases (tests/avx2_child.py)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "n", "k"), [(1, 16, 32), (1, 48, 576), (1, 112, 96),
                                              (1, 256, 64), (3, 64, 256), (4, 32, 1536),
                                              (9, 48, 2048)])
@pytest.mark.parametrize("threads", [1, 2])
def test_product_equals_float64(dtype: torch.dtype, rows: int, n: int, k: int,
                                threads: int) -> None:
    """Against the emulation at 1 and 2 threads: one row of x reads each thread's blocks as
    4 streams in step, the rest one at a time (1, 3, 7 and 16 blocks: none, some or all in
    streams)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, want, exact = case(dtype, rows, n, k)
    finally:
        torch.set_num_threads(before)
    assert (got.double() - want).abs().max() <= TOL[dtype] * want.abs().max()
    assert (got.double() - exact).abs().max() <= max(2 * TOL[dtype], 1e-4) * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "n", "k"), [(1, 112, 96), (1, 256, 576), (3, 64, 256)])
@pytest.mark.parametrize("threads", [1, 2])
def test_derived_offsets_equal_written_ones(dtype: torch.dtype, rows: int, n: int, k: int,
                                            threads: int) -> None:
    """Q8_0's codes keep their scales alone (34 bytes per 32 weights, as Q8_0's own) and the
    kernel derives each offset, -128 x scale: the product is bit for bit the one with the
    offsets written out, in streams (one row) and in tiles of rows, and close to float64."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, want, _ = case(dtype, rows, n, k, seed=threads, derived=True)
        g = torch.Generator().manual_seed(threads)
        x = torch.randn(rows, k, generator=g).to(dtype)  # case's x
        w = block_int8_groups(q8_0_like(n, k, g), dtype)
        assert torch.equal(got, quant_linear(x, w, None, INT8_KERNEL))
        assert torch.equal(got, quant_linear(x, explicit(w), None, INT8_KERNEL))
    finally:
        torch.set_num_threads(before)
    assert w.nbytes == n * k * 34 // 32
    assert (got.double() - want).abs().max() <= TOL[dtype] * want.abs().max()


def test_derived_layout_holds_the_codes() -> None:
    """The scales-alone layout read back: all rows, a chunk (dequantize's), any rows (the
    embedding lookup's), and dequantize's product."""
    codes = q8_0_like(64, 256, torch.Generator().manual_seed(0))
    w = block_int8_groups(codes, torch.float32)
    assert w.so.shape == (4, 8, 1, 16)
    want = codes.dequantize()
    assert torch.equal(w.dequantize_rows(0, 64, torch.empty(64, 256)), want)
    assert torch.equal(w.dequantize_rows(16, 48, torch.empty(64, 256)), want[16:48])
    rows = torch.tensor([5, 0, 63, 17, 17])
    assert torch.equal(w.rows_of(rows), want[rows])
    x = torch.randn(2, 256)
    torch.testing.assert_close(quant_linear(x, w, None, DEQUANTIZE),
                               quant_linear(x, explicit(w), None, DEQUANTIZE), rtol=0, atol=0)


def test_layout_holds_the_codes() -> None:
    """Dequantizing the blocked layout gives q * s + o of the codes, all rows, a chunk of 16
    rows (the dequantize method's), any rows (the embedding lookup's) and a slice of them (a
    tied LM head's vocabulary slice)."""
    codes = quantize_int8_groups(torch.randn(64, 256) * 0.05)
    w = block_int8_groups(codes, torch.float32)
    out = torch.empty(64, 256)
    assert torch.equal(w.dequantize_rows(0, 64, out), codes.dequantize())
    assert torch.equal(w.dequantize_rows(16, 48, out), codes.dequantize()[16:48])
    rows = torch.tensor([5, 0, 63, 17, 17])
    assert torch.equal(w.rows_of(rows), codes.dequantize()[rows])
    part = w.slice_rows(16, 48)
    assert part.shape == (32, 256) and torch.equal(part.rows_of(torch.tensor([1])),
                                                   codes.dequantize()[17:18])
    x = torch.randn(2, 256)
    assert torch.allclose(quant_linear(x, w, None, DEQUANTIZE), x @ codes.dequantize().T,
                          atol=1e-4)


def test_any_leading_shape_and_strides() -> None:
    """x [..., K] of any leading shape, or not contiguous, gives y [..., N], row for row the
    2-D product's."""
    w = block_int8_groups(quantize_int8_groups(torch.randn(48, 128)), torch.float32)
    x = torch.randn(2, 3, 128)
    flat = quant_linear(x.view(6, 128), w, None, INT8_KERNEL)
    assert torch.equal(quant_linear(x, w, None, INT8_KERNEL), flat.view(2, 3, 48))
    assert torch.equal(quant_linear(x.transpose(0, 1), w, None, INT8_KERNEL),
                       flat.view(2, 3, 48).transpose(0, 1))
    assert quant_linear(x[:0], w, None, INT8_KERNEL).shape == (0, 3, 48)


def test_nan_stays_in_its_row() -> None:
    w = block_int8_groups(quantize_int8_groups(torch.randn(32, 128)), torch.float32)
    x = torch.randn(3, 128)
    x[1, 70] = float("nan")
    y = quant_linear(x, w, None, INT8_KERNEL)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


def test_bad_shapes_refused() -> None:
    op = torch.ops.cpumesh_kernels.int8_linear_grouped
    q = torch.zeros(2, 4, 16, 16, 2, dtype=torch.uint8)
    s = torch.ones(2, 4, 2, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="last dimension must be 128"):
        op(torch.zeros(1, 100), q, s)
    with pytest.raises(RuntimeError, match="must be uint8"):
        op(torch.zeros(1, 128), q.to(torch.int8), s)
    with pytest.raises(RuntimeError, match=r"q must be \[N / 16, K / 32, 16, 16, 2\]"):
        op(torch.zeros(1, 128), torch.zeros(2, 4, 4, 2, 16, 2, dtype=torch.uint8), s)
    with pytest.raises(RuntimeError, match="s must be"):
        op(torch.zeros(1, 128), q, torch.ones(2, 4, 16, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="in x's dtype or float16"):
        op(torch.zeros(1, 128), q, s.bfloat16())
    with pytest.raises(RuntimeError, match=r"scales alone .* must be float16"):
        op(torch.zeros(1, 128), q, torch.ones(2, 4, 1, 16))
    with pytest.raises(RuntimeError, match=r"s must be \[2, 4, 2 or 1, 16\]"):
        op(torch.zeros(1, 128), q, torch.ones(2, 4, 3, 16, dtype=torch.float16))


def test_gguf_q8_0_blocks_taken_exactly() -> None:
    """Q8_0 (w = d * q8 per 32) is q8 + 128 with scale d and offset -128 d: gguf-py's own
    dequantization of the blocks, column slices on block bounds included."""
    from gguf import GGMLQuantizationType, quants

    from model_formats.gguf.tensors import _q8_0_codes

    w = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
    raw = quants.quantize(w, GGMLQuantizationType.Q8_0)
    want = quants.dequantize(raw, GGMLQuantizationType.Q8_0)
    for cols in ((0, 128), (32, 96)):
        got = _q8_0_codes(raw, cols).dequantize().numpy()
        assert np.array_equal(got, want[:, cols[0]:cols[1]])


def test_plan_times_the_kernel() -> None:
    """The plan times the group kernel against dequantize (ATen's weight-only kernel cannot
    read the layout); `cpumesh` and `aten` both mean the kernel, `onednn` dequantize."""
    weights = [block_int8_groups(quantize_int8_groups(torch.randn(256, 512)), torch.float32)
               for _ in range(4)]
    auto = choose_kernels("auto", torch.float32, weights)
    assert set(auto.timings_us) == {INT8_KERNEL, DEQUANTIZE}
    assert all(len(t) == 3 for t in auto.timings_us.values())
    for library in ("cpumesh", "aten"):
        assert choose_kernels(library, torch.int8, weights).libraries == (INT8_KERNEL,) * 3
    assert choose_kernels("onednn", torch.int8, weights).libraries == (DEQUANTIZE,) * 3
    x = torch.randn(1, 512)
    assert torch.equal(quant_linear(x, weights[0], None, WEIGHT_ONLY),
                       quant_linear(x, weights[0], None, INT8_KERNEL))


def test_dequantize_scratch_is_bounded_and_released_when_not_chosen(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Dequantize expands rows into at most CHUNK_BYTES of scratch (float32 activations too);
    a plan that timed dequantize but chose the kernel everywhere hands that scratch back (16 MiB
    a shard kept for nothing, 1B tp 2), one that chose dequantize somewhere keeps it. The
    timings are the plan's real calls (which make the scratch) with their results replaced, so
    which method wins is the test's choice, not the machine's speed."""
    import shard_svc.kernels as kernels
    import shard_svc.quant_linear as ql

    weights = [block_int8_groups(quantize_int8_groups(torch.randn(2048, 2048)), torch.float32)
               for _ in range(2)]
    x = torch.randn(3, 2048)
    want = x.double() @ weights[0].dequantize_rows(0, 2048, torch.empty(2048, 2048)).double().T
    got = quant_linear(x, weights[0], None, DEQUANTIZE)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert 0 < sum(b.nbytes for b in ql._scratch.b.values()) <= ql.CHUNK_BYTES
    real = kernels._time_quant
    for dequantize_wins_at, libraries, kept in (
            (None, (INT8_KERNEL,) * 3, False),
            (128, (INT8_KERNEL, INT8_KERNEL, DEQUANTIZE), True)):
        def timed(method: str, ws: list[Int8GroupWeight], tokens: int,
                  wins: int | None = dequantize_wins_at) -> float:
            real(method, ws, tokens, rounds=1)
            return 1.0 if (method == DEQUANTIZE) == (tokens == wins) else 2.0

        monkeypatch.setattr(kernels, "_time_quant", timed)
        plan = choose_kernels("auto", torch.float32, weights)
        assert plan.libraries == libraries
        assert bool(ql._scratch.__dict__.get("b")) == kept


@pytest.mark.timeout(300)
def test_avx2_build() -> None:
    """The kernel as an AVX2-only CPU builds it (`vpmaddwd`, a block's 16 rows in two vectors
    of 8), in a process with ATEN_CPU_CAPABILITY=avx2."""
    result = avx2_case_errors("tests.unit.test_int8_groups")
    assert result["isa"] == "avx2"
    for dtype in (torch.float32, torch.bfloat16):
        assert result["errors"][str(dtype)] <= TOL[dtype]


def test_int8_loads_in_groups_with_float32_activations(tmp_path: Path) -> None:
    """`--dtype int8` where the kernels build: every matrix whose shape takes groups (rows in
    16s, inputs in 32s) in groups, the embedding too with rank 1's tied LM head its rows
    256..511, float32 norms; the shard's warm-up twin preparing the weights again keeps them
    (int8_groups=False, a shard with `--kernels ipex`: per row);
    a matrix that takes no groups (down_proj at tp 2: 104 inputs) per row; the load report says
    which."""
    from model_formats.checkpoint import load_model_config
    from shard_svc.quant import Int8Weight
    from shard_svc.sharding import plan_shard
    from shard_svc.weights import load_shard_weights
    from tests.checkpoints import tiny_checkpoint

    model_dir = tiny_checkpoint(tmp_path, "llama", vocab_size=512, intermediate_size=208,
                                hidden_size=128, num_attention_heads=8,
                                tie_word_embeddings=True)
    config = load_model_config(model_dir)
    w = load_shard_weights(model_dir, config, plan_shard(config, 1, 2), torch.int8)
    layer = w.layers[0]
    assert all(isinstance(m, Int8GroupWeight) for m in (layer.qkv, layer.wo, layer.gate_up))
    assert isinstance(layer.w_down, Int8Weight) and layer.w_down.shape == (128, 104)
    assert isinstance(w.embed, Int8GroupWeight) and isinstance(w.lm_head, Int8GroupWeight)
    assert layer.input_norm.dtype == torch.float32 and w.embed.dtype == torch.float32
    assert "int8 g32 x" in w.served and "F32 -> int8 x" in w.served
    head = w.embed.rows_of(torch.arange(256, 512))
    kernels = choose_kernels("cpumesh", torch.int8, [layer.gate_up])
    for _ in range(2):
        w = kernels.prepare(w)
        assert isinstance(w.lm_head, Int8GroupWeight)
        assert torch.equal(w.lm_head.rows_of(torch.arange(256)), head)
    # --kernels ipex: per row (IPEX's weight-only int8 kernel reads per-row codes)
    w = load_shard_weights(model_dir, config, plan_shard(config, 1, 2), torch.int8,
                           int8_groups=False)
    assert isinstance(w.layers[0].qkv, Int8Weight) and isinstance(w.embed, Int8Weight)
