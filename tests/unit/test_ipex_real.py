"""The IPEX backend on the real intel_extension_for_pytorch, against the plain path's functions
and against transformers. Marked `ipex`: `make test-ipex` runs them in build/ipex-venv (torch 2.8
+ IPEX 2.8) with CPUMESH_REQUIRE_IPEX=1, where a missing or unusable IPEX fails. In the default
environment (torch 2.13, no IPEX) they are skipped, and the skip says so: the default run does
not test the backend against IPEX itself (test_ipex_fake.py covers it through a fake)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import torch.nn.functional as F

from model_formats.checkpoint import load_model_config
from services.pb.cpumesh.v1 import shard_pb2_grpc
from shard_svc.ipex_backend import MATRICES, IpexLinear, IpexPlan, block_tables, with_ipex
from shard_svc.ipex_detect import IpexStatus, detect_ipex
from shard_svc.kernels import KernelPlan, choose_kernels
from shard_svc.kv_cache import KVCache
from shard_svc.mesh.communicator import SingleRank
from shard_svc.model import ShardModel, apply_rope, make_batch, rms_norm
from shard_svc.sharding import plan_shard
from shard_svc.weights import load_shard_weights
from tests.checkpoints import tiny_checkpoint
from tests.ipex_model import decode_logits, top1
from tests.procs import running, wait_serving
from tests.service.test_kv_int8_service import shard, teacher_forced
from tests.unit.test_half_precision import agreement, continuations, transformers_top1
from tests.unit.test_model import PROMPTS

pytestmark = pytest.mark.ipex
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ipex() -> IpexStatus:
    status = detect_ipex()
    if not status.usable:
        if os.environ.get("CPUMESH_REQUIRE_IPEX"):
            pytest.fail(f"CPUMESH_REQUIRE_IPEX is set but IPEX is unusable: {status.reason}")
        pytest.skip(f"IPEX backend NOT tested here: {status.reason}; `make test-ipex` runs it")
    return status


def plan(status: IpexStatus, dtype: torch.dtype, quantize: bool = False) -> IpexPlan:
    return IpexPlan(status, choose_kernels("onednn", dtype, []), quantize)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_and_rope_equal_the_plain_functions(ipex: IpexStatus, dtype: torch.dtype) -> None:
    p, exact = plan(ipex, dtype), dtype == torch.float32
    x, w = torch.randn(7, 96, dtype=dtype), torch.randn(96, dtype=dtype)
    tol = 1e-5 if exact else None  # bfloat16: assert_close's own (1.6e-2 relative)
    torch.testing.assert_close(p.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), rtol=tol, atol=tol)
    n, hq, hkv, d = 5, 6, 2, 16
    qkv = torch.randn(n, (hq + 2 * hkv) * d, dtype=dtype)
    freqs = torch.tensor([0, 1, 9, 30, 511]).float()[:, None] * torch.rand(d // 2)[None]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    # against float32 math on the same inputs: IPEX rounds once, the plain bf16 ops per step
    want = apply_rope(qkv[:, :(hq + hkv) * d].view(n, hq + hkv, d).float(), cos.float(),
                      sin.float())
    v_before = qkv[:, (hq + hkv) * d:].clone()
    got = p.apply_rope(qkv[:, :(hq + hkv) * d].view(n, hq + hkv, d), cos, sin, hq)
    tol = 1e-5 if exact else 1e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before)  # V untouched by the in-place rotation


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention_reads_the_cache_in_place(ipex: IpexStatus,
                                                         dtype: torch.dtype) -> None:
    hkv, group, d = 2, 3, 16
    cache = KVCache(num_layers=1, num_kv_heads=hkv, head_dim=d, capacity_tokens=64,
                    page_size=4, dtype=dtype, prefix_cache=False)
    lengths = {0: 9, 1: 2, 2: 14}
    for seq in lengths:
        cache.add(seq)
    for step in range(max(lengths.values())):  # interleaved growth: pages are scattered
        cache.reserve([(s, [1]) for s, n in lengths.items() if step < n]).commit()
    cache.k.normal_()
    cache.v.normal_()
    q = torch.randn(len(lengths), hkv, group, d, dtype=dtype)
    tables, lens = block_tables(cache, list(lengths))
    got = plan(ipex, dtype).attend_decode(q, *cache.layer(0), tables, lens, 4, d ** -0.5)
    for b, seq in enumerate(lengths):
        ks, vs = cache.history(0, seq)
        want = F.scaled_dot_product_attention(q[b].float(), ks.float(), vs.float(),
                                              scale=d ** -0.5)
        torch.testing.assert_close(got[b].float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_only_int8_linear(ipex: IpexStatus, dtype: torch.dtype) -> None:
    if not ipex.fast_linear:
        pytest.skip("no avx512_fp16: the backend leaves products to the plain kernels")
    p = plan(ipex, dtype, quantize=True)
    w, b = torch.randn(200, 96, dtype=dtype), torch.randn(200, dtype=dtype)
    packed = p.woq_linear(w)
    assert isinstance(packed, IpexLinear)
    for n in (1, 8, 128):
        x = torch.randn(n, 96, dtype=dtype)
        want = F.linear(x.float(), w.float(), b.float())
        rel = (p.linear(x, packed, b).float() - want).abs().max() / want.abs().max()
        assert rel < (1e-2 if dtype == torch.float32 else 3e-2), (n, rel)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, list[list[int]]]:
    path = tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return path, continuations(path)


@pytest.mark.parametrize("tp", [1, 2])
def test_float32_model_equals_transformers(ipex: IpexStatus, tp: int,
                                           checkpoint: tuple[Path, list[list[int]]]) -> None:
    path, seqs = checkpoint
    greedy = [t for p, s in zip(PROMPTS, seqs, strict=True) for t in s[len(p):]]
    ours = decode_logits(path, torch.float32, seqs, tp, lambda k: plan_of(ipex, k))
    assert top1(ours) == greedy
    plain = decode_logits(path, torch.float32, seqs, tp)
    assert max((a - b).abs().max().item() for a, b in zip(ours, plain, strict=True)) <= 1e-3


def plan_of(status: IpexStatus, plain: KernelPlan, quantize: bool = False) -> IpexPlan:
    return IpexPlan(status, plain, quantize)


@pytest.mark.parametrize("tp", [1, 2])
def test_bfloat16_and_int8_agree_with_transformers(ipex: IpexStatus, tp: int,
                                                   checkpoint: tuple[Path, list[list[int]]]
                                                   ) -> None:
    path, seqs = checkpoint
    theirs = transformers_top1(path, torch.bfloat16, seqs)
    ours = top1(decode_logits(path, torch.bfloat16, seqs, tp, lambda k: plan_of(ipex, k)))
    assert agreement(ours, theirs) >= 0.95, agreement(ours, theirs)
    plans: list[Any] = []
    greedy = [t for p, s in zip(PROMPTS, seqs, strict=True) for t in s[len(p):]]

    def int8(k: KernelPlan) -> IpexPlan:
        plans.append(plan_of(ipex, k, quantize=True))
        return plans[-1]

    ours = top1(decode_logits(path, torch.bfloat16, seqs, tp, int8))
    assert agreement(ours, greedy) >= 0.9, agreement(ours, greedy)
    want = 2 * len(MATRICES) if ipex.fast_linear else 0
    assert [p.int8_matrices for p in plans] == [want] * tp


@pytest.mark.timeout(420)
def test_shard_processes_serve_through_ipex(ipex: IpexStatus, tmp_path: Path) -> None:
    """`python -m shard_svc` with the default --kernels auto takes IPEX by itself and says so in
    one line; its teacher-forced decode follows a `--kernels onednn` shard's (plain torch); with
    `--kernels ipex --kv-dtype int8` decode attention falls back to the plain path, said once."""
    model_dir = tiny_checkpoint(tmp_path / "model", "llama", head_dim=64,
                                num_attention_heads=4, num_key_value_heads=2)
    auto, auto_addr = shard(model_dir, tmp_path, "auto")
    plain, plain_addr = shard(model_dir, tmp_path, "plain", "--kernels", "onednn")
    int8, int8_addr = shard(model_dir, tmp_path, "int8kv", "--kernels", "ipex", "--kv-dtype",
                            "int8")
    with running([auto, plain, int8]):
        for service, address in ((auto, auto_addr), (plain, plain_addr), (int8, int8_addr)):
            wait_serving(address, service, deadline_s=300)
        with (grpc.insecure_channel(auto_addr) as a, grpc.insecure_channel(plain_addr) as b,
              grpc.insecure_channel(int8_addr) as c):
            reference = teacher_forced(shard_pb2_grpc.ShardServiceStub(b), None)
            forced = [t for t, _ in reference]
            ours = teacher_forced(shard_pb2_grpc.ShardServiceStub(a), forced)
            int8_kv = teacher_forced(shard_pb2_grpc.ShardServiceStub(c), forced)
    for got, tol in ((ours, 1e-3), (int8_kv, 0.05)):
        assert [t for t, _ in got] == forced
        for (_, x), (_, y) in zip(got, reference, strict=True):
            assert abs(x - y) <= tol * abs(y)
    logs = {s.name: s.log_path.read_text().splitlines() for s in (auto, plain, int8)}
    backend = {name: [line.split(": ", 1)[1] for line in lines if "kernel backend: " in line]
               for name, lines in logs.items()}
    assert len(backend["auto"]) == 1
    assert backend["auto"][0].startswith(f"kernel backend: IPEX {ipex.version} on torch ")
    assert backend["plain"] == ["kernel backend: plain torch (--kernels onednn)"]
    assert backend["int8kv"] == backend["auto"]
    fallback = [line for line in logs["int8kv"] if "IPEX paged attention" in line]
    assert len(fallback) == 1 and "decode attends through the plain path" in fallback[0]
    assert not any("IPEX paged attention" in line for line in logs["auto"])


def test_int8_weights_from_the_loader_go_to_ipex(ipex: IpexStatus, tmp_path: Path) -> None:
    """`--dtype int8`: with AVX512-FP16 the loader's int8 matrices (per row, as a shard with
    `--kernels ipex` loads them) are packed into IPEX's weight-only kernels as they are; greedy
    decode equals the plain int8 kernels' (dequantize) on the same codes."""
    model_dir = tiny_checkpoint(tmp_path / "model", "llama")
    config = load_model_config(model_dir)
    shard = plan_shard(config, 0, 1)
    runs = []
    for library in ("onednn", "ipex"):
        weights = load_shard_weights(model_dir, config, shard, torch.int8, int8_groups=False)
        plain = choose_kernels(library, weights.embed.dtype, [x.gate_up for x in weights.layers])
        model = ShardModel(config, shard, weights, SingleRank(), with_ipex(library, plain))
        cache, steps, run = model.new_cache(256, page_size=4), [(0, PROMPTS[0])], []
        for _ in range(8):
            logits = model.local_logits(model.forward(make_batch(steps, cache), cache))[0]
            run.append(logits)
            steps = [(0, [int(logits.argmax())])]
        runs.append((model, run))
    (_, plain_run), (ours, ipex_run) = runs
    assert [int(x.argmax()) for x in ipex_run] == [int(x.argmax()) for x in plain_run]
    for x, y in zip(ipex_run, plain_run, strict=True):
        assert (x - y).abs().max() <= 0.05 * y.abs().max()
    assert isinstance(ours.kernels, IpexPlan)
    assert ours.kernels.int8_matrices == (2 * len(MATRICES) if ipex.fast_linear else 0)
