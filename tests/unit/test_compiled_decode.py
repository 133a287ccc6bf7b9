"""The compiled decode step (--compile decode) against the eager path on a tiny random model:
the same teacher-forced steps through both, top-5 logits close and top-1 equal (float32) or
agreeing >= 95 % (bfloat16), at tp 1 (in process) and tp 2 (a process per rank over the mesh);
no graph compiled after warm-up although tokens, batch sizes and context lengths change.

Tolerances: float32 logits within 1e-4 (measured ~5e-6); bfloat16 within 5 % of the largest
|logit| (the fused kernels round elsewhere than eager: ~1-2 % measured, a bfloat16 step being
1/128)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import shard_svc.weights
from shard_svc.config import ShardConfig
from shard_svc.mesh.communicator import SingleRank
from shard_svc.quant import activations_dtype
from shard_svc.quant_linear import int8_group_kernel
from tests.avx2_child import AVX2_ENV
from tests.checkpoints import tiny_checkpoint
from tests.compiled_ranks import (
    compilable_model,
    rank_side_by_side,
    rank_side_by_side_alone,
    side_by_side,
)
from tests.mesh_procs import ports, ranks

AGREEMENT = 0.95
QUANT = ("int8", "int4")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Intermediate 192: int4 groups of 32 and inductor's int8 GEMM need widths of 16 x n."""
    return tiny_checkpoint(tmp_path_factory.mktemp("llama-q"), "llama", intermediate_size=192)


def act(dtype: str) -> str:
    """The activations' dtype of a model served in `dtype`: int8 in groups (where cpumesh's
    kernels build) float32, int8 per row and int4 bfloat16 on AVX-512, else float32."""
    if dtype == "int8" and int8_group_kernel():
        return "float32"
    return str(activations_dtype()).removeprefix("torch.") if dtype in QUANT else dtype


@pytest.fixture
def int8_per_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """--dtype int8 loads per row, as where cpumesh's kernels (int8 in groups) do not build."""
    monkeypatch.setattr(shard_svc.weights, "int8_group_kernel", lambda: False)


def check(result: dict[str, Any], dtype: str, int16_x: bool = False) -> None:
    """int16_x: the products round x to int16 per row (cpumesh's int8 kernels), where a last-bit
    difference of a float32 activation can move a rounding: logits within 5e-4 of the largest
    (measured 6e-5), top-1 agreeing >= 95 %."""
    assert result["graphs"] == result["warm_graphs"] > 0, "a graph was compiled while serving"
    decode_steps = len(result["steps"]) - 2  # two prefills, eager in both
    assert result["compiled_steps"] == decode_steps
    agree = total = 0
    for (eager_v, eager_i), (comp_v, comp_i) in result["steps"]:
        e, c = torch.tensor(eager_v), torch.tensor(comp_v)
        atol = (5e-4 * e.abs().max().item() if int16_x and dtype == "float32" else
                1e-4 if dtype == "float32" else 0.05 * e.abs().max().item())
        assert torch.allclose(e, c, rtol=0, atol=atol), (e - c).abs().max().item()
        agree += sum(a[0] == b[0] for a, b in zip(eager_i, comp_i, strict=True))
        total += len(eager_i)
    if dtype == "float32" and not int16_x:
        assert agree == total
    else:
        assert agree >= AGREEMENT * total, f"top-1 agreement {agree}/{total}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_compiled_decode_matches_eager_tp1(model_dir: Path, quant_dir: Path, dtype: str) -> None:
    """int8 / int4: weight-only matrices frozen as codes; the activations (`act`) bfloat16
    held to bfloat16's tolerance, float32 to float32's."""
    torch.set_num_threads(2)
    result = side_by_side(quant_dir if dtype in QUANT else model_dir, SingleRank(), dtype, (1, 4))
    check(result, act(dtype), int16_x=dtype == "int8")
    assert result["attention"], "the C++ decode attention did not build here"
    assert "cpumesh_kernels::decode_attention" in result["decode_ops"]
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in result["decode_ops"]
    if dtype == "int8":  # products by cpumesh's group kernel (int8 in groups)
        assert "aten::_weight_int8pack_mm" not in result["decode_ops"]
        assert "cpumesh_kernels::int8_linear_grouped" in result["decode_ops"]
    if dtype == "int4":  # cpumesh's int4 kernel; the int8 LM head by its int8 kernel (not
        # folded by inductor into a bfloat16 copy of the table)
        assert "cpumesh_kernels::int4_linear_blocked" in result["decode_ops"]
        assert "cpumesh_kernels::int8_linear" in result["decode_ops"]
        assert "aten::_weight_int4pack_mm_for_cpu" not in result["decode_ops"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("library", ["aten", "cpumesh"])
def test_compiled_int8_products_as_the_kernel_plan_chose(quant_dir: Path, library: str,
                                                         int8_per_row: None) -> None:
    """int8 per row, --kernels aten: the graph's int8 products are inductor's C++ GEMM template
    (never ATen's `_weight_int8pack_mm`, gemm_backends); cpumesh: cpumesh's int8 kernel, an
    opaque op."""
    torch.set_num_threads(2)
    result = side_by_side(quant_dir, SingleRank(), "int8", (1, 4), library=library)
    check(result, str(activations_dtype()).removeprefix("torch."))
    assert "aten::_weight_int8pack_mm" not in result["decode_ops"]
    assert ("cpumesh_kernels::int8_linear" in result["decode_ops"]) == (library == "cpumesh")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_decode_without_the_attention_kernel(model_dir: Path, dtype: str) -> None:
    """Where the C++ decode attention cannot build, a graph gathers each history for SDPA."""
    torch.set_num_threads(2)
    result = side_by_side(model_dir, SingleRank(), dtype, (1, 4), kernel=False)
    check(result, dtype)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in result["decode_ops"]
    assert "cpumesh_kernels::decode_attention" not in result["decode_ops"]


@pytest.mark.timeout(600)
def test_compiled_decode_matches_eager_tp2_processes(model_dir: Path, quant_dir: Path) -> None:
    points = {"float32": model_dir, "bfloat16": model_dir, "int8": quant_dir}
    mesh_ports = ports(2)
    with ranks() as r:
        for rank in range(2):
            r.start(f"rank{rank}", rank_side_by_side, rank, mesh_ports, points)
        results = [r.wait(f"rank{rank}", "done", 580) for rank in range(2)]
    for result in results:
        for dtype in points:
            check(result[dtype], act(dtype), int16_x=dtype == "int8")


@pytest.mark.timeout(300)
def test_compiled_bfloat16_right_where_inductor_vectorizes_with_avx2(
        model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With AVX2 only (tests.avx2_child.AVX2_ENV in a spawned process; the real thing on an AVX2
    CPU), inductor's C++ GEMM template computed NaN logits at 2 threads in bfloat16: such a
    graph takes ATen's GEMMs (compiled_gemms.gemm_backends)."""
    for name, value in AVX2_ENV.items():
        monkeypatch.setenv(name, value)
    with ranks() as r:
        r.start("alone", rank_side_by_side_alone, model_dir, "bfloat16")
        result = r.wait("alone", "done", 280)
    assert (result["isa"], result["gemms"], result["attention"]) == ("avx2", "ATEN", "avx2")
    check(result, "bfloat16")


@pytest.mark.timeout(300)
def test_gemm_backends_without_a_choice_fall_back_to_max_autotune(
        quant_dir: Path, caplog: pytest.LogCaptureFixture, int8_per_row: None) -> None:
    """A graph whose allowed GEMM backends offer nothing for a product (here TRITON, absent on
    CPU; inductor raises NoValidChoicesError) compiles with max-autotune's choice, logged, and
    runs compiled, equal to eager."""
    from shard_svc.compiled_step import CompiledDecode
    from shard_svc.engine import SeqWork, ShardEngine

    torch.set_num_threads(2)
    model = compilable_model(quant_dir, SingleRank(), "int8", "aten")  # inductor's int8 GEMM
    compiled = CompiledDecode(model, buckets=(1,))
    compiled.gemms = "TRITON"
    cache = model.new_cache(64, page_size=4)
    with caplog.at_level("WARNING", logger="cpumesh.shard"):
        compiled.warm_up(cache)
    assert compiled.gemms is None and compiled.warm == {1}
    assert "no TRITON GEMM for a product of this graph (" in caplog.text
    assert "NoValidChoicesError" in caplog.text  # inductor may wrap it (LoweringException)
    engines = [ShardEngine(model, model.new_cache(64, page_size=4)),
               ShardEngine(model, cache, compiled=compiled)]
    outs = []
    for e in engines:
        e.step(1, [SeqWork(0, (5, 17, 42), True, top_k=5)])
        outs.append(e.step(2, [SeqWork(0, (7,), False, top_k=5)]).results[0])
    assert compiled.steps == 1
    eager, comp = (torch.tensor(o.logits) for o in outs)
    assert torch.allclose(eager, comp, rtol=0, atol=0.05 * eager.abs().max().item())


@pytest.mark.timeout(600)
def test_int8_widths_inductor_cannot_take_stay_eager(model_dir: Path, int8_per_row: None
                                                     ) -> None:
    """Inductor's int8 GEMM cannot take inputs 200 wide (intermediate 200, int8 per row);
    cpumesh's int8 kernel takes every width, so with it such a model compiles (and equals
    eager)."""
    from shard_svc.compiled_step import not_compilable

    why = not_compilable(compilable_model(model_dir, SingleRank(), "int8", "aten"))
    assert why and "int8 matrices [200] inputs wide" in why
    assert not_compilable(compilable_model(model_dir, SingleRank(), "float32")) is None
    torch.set_num_threads(2)
    result = side_by_side(model_dir, SingleRank(), "int8", (1, 4), library="cpumesh")
    check(result, str(activations_dtype()).removeprefix("torch."))
    assert "cpumesh_kernels::int8_linear" in result["decode_ops"]


def test_compile_flag() -> None:
    assert ShardConfig(Path("m"), 0, 1, ("127.0.0.1:1",)).compile == "off"
    with pytest.raises(ValueError, match="compile"):
        ShardConfig(Path("m"), 0, 1, ("127.0.0.1:1",), compile="all")
    with pytest.raises(ValueError, match="packed"):
        ShardConfig(Path("m"), 0, 1, ("127.0.0.1:1",), compile="decode", kernels="packed")


def test_compile_rows_through_cpumesh_shard(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import build_parser, main, subcommand
    from shard_svc.cli import build_config

    def config(*flags: str) -> ShardConfig:
        args = build_parser(subcommand("shard"), "shard").parse_args(
            ["shard", "--model-dir", str(tmp_path), *flags])
        args.environ = {}
        return build_config(args)

    assert config().compile_rows == (1, 8)
    assert config("--compile", "decode", "--compile-rows", "16,1,4,4").compile_rows == (1, 4, 16)
    with pytest.raises(SystemExit):
        main(["shard", "--model-dir", str(tmp_path), "--compile-rows", "1,x"], environ={})
    assert "expected numbers separated by commas: '1,x'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["shard", "--model-dir", str(tmp_path), "--compile-rows", "0,8"], environ={})
    assert "compile_rows must be 1 to 256 rows each, got (0, 8)" in str(e.value)
