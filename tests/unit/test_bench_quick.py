"""`make bench-quick`'s code paths run end to end on tiny inputs (not their timings): every
stage of `python -m bench`, the report and its plots, and `cpumesh loadtest`'s SSE parsing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bench.__main__ import Plan, merge_rows, quick_plan, run_plan
from bench.models import BenchModel, smollm2
from tests.checkpoints import tiny_checkpoint
from tools.loadtest import LoadConfig, parse_dist
from tools.loadtest_clients import sse_events


def test_bench_quick_paths(tmp_path: Path) -> None:
    tiny = BenchModel("tiny", "tiny random Llama", tiny_checkpoint(tmp_path / "tiny", "llama"))
    quick = quick_plan(tmp_path / "cache")
    plan = Plan(tmp_path / "out", (tiny,), smollm2(), batches=(2,), tokens=3, repeats=1,
                tp_steps=2, users=(2,), serving_requests=2, serving_duration_s=10.0,
                serving_output="3", multihost_rates=quick.multihost_rates, multihost_steps=2,
                multihost_delays_us=quick.multihost_delays_us,
                cache=tmp_path / "cache", command="test", peers=False)
    md = run_plan(plan).read_text()
    results = tmp_path / "out" / "results"
    ml = json.loads((results / "model_level.json").read_text())
    assert {r["system"] for r in ml["rows"]} == {"cpumesh", "transformers"}
    assert "disabled" in ml["skipped"]
    tp = json.loads((results / "tp_scaling.json").read_text())
    assert [r["tp"] for r in tp["rows"]] == [1, 2]
    serving = json.loads((results / "serving.json").read_text())
    for rows in serving["systems"].values():
        assert rows[0]["ok"] == 2 and rows[0]["output_tokens"] == 6
        assert rows[0]["length_mismatches"] == 0
    mh = json.loads((results / "multihost.json").read_text())
    assert mh["baseline"]["wall_ms"] > 0
    assert mh["skipped"] or [(r["rate"], r["delay_us"]) for r in mh["sweep"]] == [
        ("10gbit", 200.0)]  # where namespaces are not allowed, the reason is recorded
    for heading in ("## Machine", "### Headline", "## Tensor-parallel", "## Multi-host",
                    "Qwen2-72B", "## Service-level"):
        assert heading in md
    for png in ("decode", "tp_scaling", "projection", "serving"):
        assert (tmp_path / "out" / "plots" / f"{png}.png").stat().st_size > 1000


class _Stream:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self):  # type: ignore[no-untyped-def]
        for c in self.chunks:
            yield c


def test_sse_parsing_is_robust() -> None:
    raw = (b": keep-alive\r\n\r\ndata: {\"a\": 1}\r\n\r\nevent: x\ndata: line1\ndata: line2\n\n"
           b"data:[DONE]")
    for cut in range(len(raw)):  # every split into two network chunks gives the same events
        events = asyncio.run(_collect(_Stream([raw[:cut], raw[cut:]])))
        assert events == ['{"a": 1}', "line1\nline2", "[DONE]"], cut


async def _collect(stream: _Stream) -> list[str]:
    return [e async for e in sse_events(stream)]


def test_load_config_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        LoadConfig("grpc://x:1")
    with pytest.raises(ValueError, match="bad length"):
        LoadConfig("grpc://x:1", users=1, prompt_tokens="9:3")
    import random

    rng = random.Random(0)
    assert {parse_dist("4")(rng)} == {4}
    assert all(2 <= parse_dist("2:5")(rng) <= 5 for _ in range(50))
    assert all(parse_dist("exp:3")(rng) >= 1 for _ in range(50))


def test_rerunning_one_model_keeps_the_other_models_rows() -> None:
    old = {"tokens": 32, "repeats": 3, "rows": [{"model": "a", "batch": 1},
                                                 {"model": "b", "batch": 1}]}
    new = {"tokens": 16, "repeats": 2, "rows": [{"model": "b", "batch": 1, "tokens": 16}]}
    merged = merge_rows(old, new, {"b"})
    assert merged["rows"] == [{"tokens": 32, "repeats": 3, "model": "a", "batch": 1},
                              {"model": "b", "batch": 1, "tokens": 16}]
    assert merged["tokens"] == 16


def test_model_level_runs_each_precision(tmp_path: Path) -> None:
    """bench.model_level (what bench.decode_speed runs for cpumesh) at half precision: it runs,
    reports every repeat and names the kernels the shard chose."""
    from bench.model_level import run_system

    tiny = tiny_checkpoint(tmp_path / "tiny", "llama")
    for dtype in ("bfloat16", "float16"):
        r = run_system("cpumesh", tiny, 2, 8, 3, 1, 2, dtype)
        assert len(r["prefill_ms"]) == len(r["decode_step_ms"]) == 2
        assert r["kernels"].startswith(f"kernels for {dtype} on ")


def test_greedy_agreement_runs(tmp_path: Path) -> None:
    """`python -m bench.greedy_agreement` (the `make serve` default's evidence) runs and names
    a default; each half precision's first difference lies within the tokens decoded."""
    import subprocess
    import sys

    out = tmp_path / "agreement.json"
    run = subprocess.run([sys.executable, "-m", "bench.greedy_agreement", "--tokens", "6",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Default of `make serve`:" in run.stdout
    result = json.loads(out.read_text())
    assert [r["dtype"] for r in result["rows"]] == ["bfloat16", "float16"]
    for r in result["rows"]:
        assert all(f is None or 0 <= f < 6 for f in r["first_difference"])


def test_shard_steps_batches_are_checked_by_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.shard_steps import batch_sizes, main

    assert batch_sizes("1,8") == [1, 8]
    for bad in ("x", "0", "1,,8"):
        with pytest.raises(SystemExit) as e:
            main(["--batches", bad])
        assert e.value.code == 2
        assert "positive integers, comma-separated" in capsys.readouterr().err


def test_gemm_backends_runs(tmp_path: Path) -> None:
    """`python -m bench.gemm_backends` (the int8 GEMM choice's evidence) runs both variants'
    compiled graphs interleaved, every step compiled, and names the shard's choice."""
    import subprocess
    import sys

    tiny = tiny_checkpoint(tmp_path / "tiny", "llama", intermediate_size=192)
    out = tmp_path / "gemm.json"
    run = subprocess.run([sys.executable, "-m", "bench.gemm_backends", "--model-dir", str(tiny),
                          "--dtype", "int8", "--steps", "3", "--variants", "max-autotune,CPP",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["shard_choice"] == "CPP"
    assert list(result["variants"]) == ["max-autotune", "CPP"]
    for v in result["variants"].values():
        assert v["ms_per_step"] > 0 and v["nan_steps"] == 0
    assert "greedy tokens equal in" in run.stdout


def test_decode_attention_bench_runs(tmp_path: Path) -> None:
    """`python -m bench.decode_attention` (the C++ decode attention's evidence) runs both graphs
    interleaved at two contexts, every step compiled, and reports growth from the first."""
    import subprocess
    import sys

    tiny = tiny_checkpoint(tmp_path / "tiny", "llama")
    out = tmp_path / "attention.json"
    run = subprocess.run([sys.executable, "-m", "bench.decode_attention", "--model-dir",
                          str(tiny), "--dtype", "float32", "--contexts", "8,100", "--steps", "3",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["contexts"] == [8, 100] and result["isa"]
    assert result["steps_agreeing"] == [3, 3]  # float32: the same greedy tokens
    for name in ("sdpa", "kernel"):
        assert len(result["ms_per_step"][name]) == 2 and result["nan_steps"][name] == [0, 0]
        assert result["growth"][name][0] == 1.0
    assert "| 100 |" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.decode_attention", "--contexts", "8,x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "positive integers, comma-separated" in bad.stderr


def test_precision_ratio_bench_runs(tmp_path: Path) -> None:
    """`python -m bench.precision_ratio` (int8 against our half precision, interleaved) runs
    each dtype's steps in one process and reports every repeat's speed-up over the first; one
    dtype may come from another directory (`--source`)."""
    import subprocess
    import sys

    tiny = tiny_checkpoint(tmp_path / "tiny", "llama", intermediate_size=192)
    other = tiny_checkpoint(tmp_path / "other", "llama", intermediate_size=192)
    out = tmp_path / "precision.json"
    run = subprocess.run([sys.executable, "-m", "bench.precision_ratio", "--model-dir", str(tiny),
                          "--dtypes", "bfloat16,int8", "--compile", "off", "--steps", "3",
                          "--repeats", "2", "--source", f"int8={other}", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dtypes"] == ["bfloat16", "int8"] and result["nan_steps"] == {
        "bfloat16": 0, "int8": 0}
    ms = result["ms_per_step"]
    assert all(len(v) == 2 and min(v) > 0 for v in ms.values())
    assert result["speedup"]["int8"] == pytest.approx(
        [b / i for b, i in zip(ms["bfloat16"], ms["int8"], strict=True)])
    assert "int8 over bfloat16" in run.stdout and "| int8 |" in run.stdout
    assert result["sources"] == {"int8": str(other)} and f"--source int8={other}" in run.stdout
    for bad, says in ((["--dtypes", "int8,int8"], "distinct names"),
                      (["--source", f"int8={tmp_path / 'none'}"], "DTYPE=DIR with a model"),
                      (["--source", f"int9={other}"], "distinct names"),
                      (["--model-dir", str(tmp_path / "none")], "no model at"),
                      (["--steps", "0"], "a positive integer")):
        r = subprocess.run([sys.executable, "-m", "bench.precision_ratio", *bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and says in r.stderr, r.stderr


def test_projection_bench_runs(tmp_path: Path) -> None:
    """`python -m bench.projection` measures the step's share of the read probe per repeat and
    projects Qwen2-72B at the weights' own bytes: at bfloat16 2 bytes a weight, counted from
    the shard's matrices and checked here against the config's parameter count."""
    import subprocess
    import sys

    tiny = tiny_checkpoint(tmp_path / "tiny", "llama", intermediate_size=192)
    cfg = json.loads((tiny / "config.json").read_text())
    h, d = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    layer = (h * (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * d
             + cfg["num_attention_heads"] * d * h + 3 * h * cfg["intermediate_size"])
    params = cfg["num_hidden_layers"] * layer + cfg["vocab_size"] * h
    for dtype, low, high in (("bfloat16", 2.0, 2.0), ("int8", 1.0, 1.125)):
        out = tmp_path / f"{dtype}.json"
        run = subprocess.run([sys.executable, "-m", "bench.projection", "--model-dir", str(tiny),
                              "--dtype", dtype, "--compile", "off", "--steps", "3", "--repeats",
                              "2", "--probe-mib", "64", "--out", str(out)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        r = json.loads(out.read_text())
        assert r["params_per_step"] == params and len(r["repeats"]) == 2
        assert all(x["fraction"] > 0 and min(x["read_gbs"]) > 0 for x in r["repeats"])
        p = r["projection"]
        assert low <= p["assumed"]["weight_bytes"] <= high
        assert p["total_ms"] == pytest.approx(p["compute_ms"] + p["allreduce_ms"]
                                              + p["overhead_ms"])
        assert "ms/token" in run.stdout and "| 2 |" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.projection", "--model-dir",
                          str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no model at" in bad.stderr
