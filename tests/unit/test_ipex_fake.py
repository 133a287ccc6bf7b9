"""The IPEX backend without IPEX: detection (absent, built for another torch, failing at import:
the plain path and its log line), and the shard's model driven through a fake of the IPEX 2.8
API (tests/fake_ipex.py), which shows it calls that API as documented and that its logits and
greedy tokens equal the plain path's. The same backend against the real IPEX: test_ipex_real.py
(`make test-ipex`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from services.errors import InvalidArgument
from shard_svc import ipex_detect
from shard_svc.ipex_backend import MATRICES, IpexLinear, IpexPlan, quantize_int8_rows, with_ipex
from shard_svc.ipex_detect import MODULE, IpexStatus, cpu_flags, detect_ipex, select_backend
from shard_svc.kernels import choose_kernels
from shard_svc.weights import ShardWeights
from tests import fake_ipex
from tests.checkpoints import tiny_checkpoint
from tests.fake_ipex import OTHER, stand_in_package
from tests.ipex_model import decode_logits, top1
from tests.unit.test_half_precision import continuations
from tests.unit.test_model import PROMPTS

FAST = frozenset({"avx512_fp16", "amx_bf16"})


def fake_plan(fake: Any, plain: Any, flags: frozenset[str] = FAST,
              quantize: bool = False) -> IpexPlan:
    return IpexPlan(IpexStatus(fake, "imported", fake.__version__, flags), plain, quantize)


def test_absent_module_takes_plain_path_and_logs_it(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, MODULE, None)  # import machinery: "not installed"
    with caplog.at_level(logging.INFO, logger=ipex_detect.__name__):
        status = select_backend()
    assert not status.usable and status.reason == f"{MODULE} is not installed"
    assert [r.getMessage() for r in caplog.records] == [
        f"kernel backend: plain torch ({MODULE} is not installed)"]


def test_other_torch_is_refused_before_import(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """IPEX exits at import on a torch it was not built for: the metadata decides first."""
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    stand_in_package(tmp_path, OTHER, "raise SystemExit(127)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.INFO, logger=ipex_detect.__name__):
        status = select_backend()
    assert MODULE not in sys.modules
    want = (f"{MODULE} {OTHER} needs torch {OTHER.rsplit('.', 1)[0]}, this is torch "
            f"{torch.__version__}")
    assert not status.usable and status.reason == want
    assert caplog.records[0].getMessage() == f"kernel backend: plain torch ({want})"


def test_loaded_module_of_other_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ipex.install(monkeypatch, OTHER + "+cpu")
    status = detect_ipex()
    assert not status.usable and "needs torch" in status.reason


def test_import_failure_takes_plain_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    stand_in_package(tmp_path, torch.__version__.split("+")[0],
                     "raise OSError('libintel-ext-pt-cpu.so: cannot open shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    status = detect_ipex()
    assert not status.usable
    assert "failed to import: OSError: libintel-ext-pt-cpu.so" in status.reason
    with pytest.raises(ValueError, match="not usable"):
        IpexPlan(status, choose_kernels("onednn", torch.float32, []))


def test_matching_module_is_used_and_logged(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    fake = fake_ipex.install(monkeypatch)
    version = fake.__version__
    with caplog.at_level(logging.INFO, logger=ipex_detect.__name__):
        status = select_backend()
    assert status.module is fake and status.version == version
    line = caplog.records[0].getMessage()
    assert line.startswith(f"kernel backend: IPEX {version} on torch {torch.__version__}")
    assert ("its weight-only linear" in line) == status.fast_linear


def test_kernels_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = choose_kernels("onednn", torch.float32, [])
    monkeypatch.setitem(sys.modules, MODULE, None)
    assert with_ipex("auto", plain) is plain
    with pytest.raises(InvalidArgument, match=f"kernels 'ipex': {MODULE} is not installed"):
        with_ipex("ipex", plain)
    fake = fake_ipex.install(monkeypatch)
    for library in ("auto", "ipex"):
        chosen = with_ipex(library, plain)
        assert isinstance(chosen, IpexPlan) and chosen.ipex is fake and chosen.fallback is plain
    assert with_ipex("aten", plain) is plain


def test_cpu_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_fp16 amx_int8\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_fp16", "amx_int8"}
    assert cpu_flags(tmp_path / "absent") == frozenset()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    path = tiny_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")  # QKV bias, GQA
    return path, continuations(path)


@pytest.mark.parametrize("tp", [1, 2])
def test_model_through_fake_ipex_equals_plain_path(
        monkeypatch: pytest.MonkeyPatch, checkpoint: tuple[Path, list[list[int]]],
        tp: int) -> None:
    fake = fake_ipex.install(monkeypatch)
    path, seqs = checkpoint
    plain = decode_logits(path, torch.float32, seqs, tp)
    ours = decode_logits(path, torch.float32, seqs, tp, lambda p: fake_plan(fake, p))
    assert max((a - b).abs().max().item() for a, b in zip(ours, plain, strict=True)) <= 1e-4
    greedy = [t for p, s in zip(PROMPTS, seqs, strict=True) for t in s[len(p):]]
    assert top1(ours) == top1(plain) == greedy  # transformers' greedy continuation
    assert {"rms_norm", "rotary_embedding", "single_query_cached_kv_attention"} <= set(fake.calls)
    assert "ipex_woq_linear" not in fake.calls  # float weights stay float unless quantize=True


def test_int8_kv_cache_attends_through_the_plain_path(
        monkeypatch: pytest.MonkeyPatch, checkpoint: tuple[Path, list[list[int]]],
        caplog: pytest.LogCaptureFixture) -> None:
    """IPEX's paged attention reads a float cache: with an int8 one the model says so once and
    decodes with its own attention (still IPEX's norm and rotary), as the plain path does."""
    fake = fake_ipex.install(monkeypatch)
    path, seqs = checkpoint
    with caplog.at_level(logging.INFO, logger="shard_svc.model"):
        ours = decode_logits(path, torch.float32, seqs, 1, lambda p: fake_plan(fake, p),
                             kv_dtype=torch.int8)
    plain = decode_logits(path, torch.float32, seqs, 1, kv_dtype=torch.int8)
    assert max((a - b).abs().max().item() for a, b in zip(ours, plain, strict=True)) <= 1e-4
    assert top1(ours) == top1(plain)
    assert "single_query_cached_kv_attention" not in fake.calls
    assert {"rms_norm", "rotary_embedding"} <= set(fake.calls)
    assert [r.getMessage() for r in caplog.records if r.name == "shard_svc.model"] == [
        "IPEX paged attention reads a float KV cache: with an int8 KV cache, decode attends "
        "through the plain path"]


def dequantize_layers(w: ShardWeights) -> None:
    """The plain path's twin of weight-only int8: the same codes, expanded to float."""
    for layer in w.layers:
        for name in MATRICES:
            q, s = quantize_int8_rows(getattr(layer, name))
            setattr(layer, name, q.float() * s[:, None])


def test_weight_only_int8_through_fake_equals_dequantized_plain_path(
        monkeypatch: pytest.MonkeyPatch, checkpoint: tuple[Path, list[list[int]]]) -> None:
    fake = fake_ipex.install(monkeypatch)
    path, seqs = checkpoint
    plans: list[IpexPlan] = []

    def plan_for(plain: Any) -> IpexPlan:
        plans.append(fake_plan(fake, plain, quantize=True))
        return plans[-1]

    ours = decode_logits(path, torch.float32, seqs, 2, plan_for)
    twin = decode_logits(path, torch.float32, seqs, 2, weights_hook=dequantize_layers)
    assert max((a - b).abs().max().item() for a, b in zip(ours, twin, strict=True)) <= 1e-4
    assert [p.int8_matrices for p in plans] == [2 * len(MATRICES)] * 2  # 2 layers, 2 ranks
    assert {"from_float_and_qweight", "ipex_woq_linear"} <= set(fake.calls)
    assert "in IPEX weight-only int8" in plans[0].describe()


def test_int8_weights_from_a_loader_are_packed_as_they_are(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_ipex.install(monkeypatch)
    plan = fake_plan(fake, choose_kernels("onednn", torch.bfloat16, []))
    q = torch.randint(-127, 128, (24, 16), dtype=torch.int8)
    loaded = SimpleNamespace(q=q, scales=torch.rand(24, dtype=torch.bfloat16))  # quant.Int8Weight
    packed = plan.woq_linear(loaded)
    assert isinstance(packed, IpexLinear) and packed.shape == (24, 16)
    x, b = torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(24, dtype=torch.bfloat16)
    want = F.linear(x.float(), q.float() * loaded.scales.float()[:, None]) + b.float()
    torch.testing.assert_close(plan.linear(x, packed, b).float(), want, rtol=2e-2, atol=5e-2)
    assert plan.woq_linear(torch.randn(4, 4)) is None  # float, quantize=False: stays plain
    assert plan.woq_linear(SimpleNamespace(packed=q, group=32)) is None  # int4: the fallback's


def test_without_avx512_fp16_products_stay_plain(monkeypatch: pytest.MonkeyPatch,
                                                 checkpoint: tuple[Path, list[list[int]]]
                                                 ) -> None:
    fake = fake_ipex.install(monkeypatch)
    path, seqs = checkpoint
    plans: list[IpexPlan] = []

    def plan_for(plain: Any) -> IpexPlan:
        plans.append(fake_plan(fake, plain, frozenset({"avx2"}), quantize=True))
        return plans[-1]

    decode_logits(path, torch.float32, seqs, 1, plan_for)
    assert plans[0].int8_matrices == 0 and "ipex_woq_linear" not in fake.calls
    assert "no avx512_fp16: IPEX would dequantize per call" in plans[0].status.describe()
