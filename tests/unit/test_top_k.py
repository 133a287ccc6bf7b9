"""The step's top k and log-sum-exps (shard_svc/top_k.py): the C++ kernel against a float64
reference and against torch's topk / logsumexp, the fallbacks, and the AVX2 build."""

from __future__ import annotations

import math

import pytest
import torch

from shard_svc import top_k
from tests.avx2_child import run_avx2


@pytest.fixture(autouse=True)
def _built() -> None:
    assert top_k.kernel(), "the C++ kernels did not build here (see the log)"


def reference(logits: torch.Tensor, k: int, temperature: torch.Tensor
              ) -> tuple[list[list[float]], list[list[int]], list[float], list[float]]:
    """Sorted by (value descending, index ascending); log-sum-exps in float64."""
    values, ids, lse, lse_t = [], [], [], []
    for row, t in zip(logits.tolist(), temperature.tolist(), strict=True):
        best = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        values.append([row[i] for i in best])
        ids.append(best)
        x = torch.tensor(row, dtype=torch.float64)
        lse.append(torch.logsumexp(x, 0).item())
        lse_t.append(torch.logsumexp(x / float(torch.tensor(t)), 0).item())
    return values, ids, lse, lse_t


@pytest.mark.parametrize(("rows", "vocab", "k"), [
    (1, 49152, 1), (1, 49152, 20), (3, 1000, 64), (2, 37, 37), (4, 5, 3), (8, 4099, 7)])
def test_kernel_against_float64(rows: int, vocab: int, k: int) -> None:
    g = torch.Generator().manual_seed(rows * vocab + k)
    logits = torch.randn(rows, vocab, generator=g) * 6
    logits[0, vocab // 2] = float("-inf")  # a masked logit
    temperature = torch.tensor([1.0, 0.7, 1.3, 0.25, 2.0, 1.0, 0.5, 0.9][:rows])
    values, ids, lse, lse_t = torch.ops.cpumesh_kernels.top_k_lse(logits, k, temperature)
    want = reference(logits, k, temperature)
    assert values.tolist() == want[0] and ids.tolist() == want[1]
    for got, expected in ((lse, want[2]), (lse_t, want[3])):
        assert got.dtype == torch.float32
        for a, b in zip(got.tolist(), expected, strict=True):
            assert math.isclose(a, b, rel_tol=2e-6, abs_tol=2e-6)


def test_equal_logits_lower_index_first() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0] * 7])
    _, ids, _, _ = torch.ops.cpumesh_kernels.top_k_lse(logits, 4, torch.ones(1))
    assert ids.tolist() == [[1, 2, 4, 6]]


def test_infinite_rows_as_torch() -> None:
    logits = torch.full((2, 40), float("-inf"))
    logits[1, 3] = float("inf")
    values, ids, lse, lse_t = top_k.top_k_lse(logits, 2, torch.tensor([1.0, 0.5]))
    assert lse.tolist() == torch.logsumexp(logits, -1).tolist() == [float("-inf"), float("inf")]
    assert lse_t.tolist() == lse.tolist()
    assert values[1, 0].item() == float("inf") and ids[1, 0].item() == 3


def test_nan_and_large_k_take_torch() -> None:
    """A row holding a NaN, or k above KERNEL_MAX_K: torch's answer, whatever the kernel's."""
    logits = torch.randn(2, 300)
    logits[1, 7] = float("nan")
    t = torch.ones(2)
    for k in (3, top_k.KERNEL_MAX_K + 1):
        got = top_k.top_k_lse(logits, k, t)
        want_values, want_ids = torch.topk(logits, k, dim=-1)
        torch.testing.assert_close(got[0], want_values, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got[1], want_ids)
        assert got[2].isnan().tolist() == [False, True]


def test_bad_arguments_refused() -> None:
    op = torch.ops.cpumesh_kernels.top_k_lse
    with pytest.raises(RuntimeError, match="logits must be float32"):
        op(torch.zeros(1, 8, dtype=torch.bfloat16), 1, torch.ones(1))
    with pytest.raises(RuntimeError, match=r"k must be 1\.\.8"):
        op(torch.zeros(1, 8), 9, torch.ones(1))
    with pytest.raises(RuntimeError, match=r"temperature must be float32 \[2\]"):
        op(torch.zeros(2, 8), 1, torch.ones(1))


CHILD = """
import json, torch
from shard_svc import native
isa = native.load()
logits = torch.randn(3, 1001) * 4
t = torch.tensor([1.0, 0.6, 1.7])
values, ids, lse, lse_t = torch.ops.cpumesh_kernels.top_k_lse(logits, 9, t)
want_v, want_i = torch.topk(logits, 9, dim=-1)
err = max((lse - torch.logsumexp(logits.double(), -1)).abs().max().item(),
          (lse_t - torch.logsumexp(logits.double() / t[:, None], -1)).abs().max().item())
print(json.dumps({"isa": isa, "equal": torch.equal(values, want_v) and torch.equal(ids, want_i),
                  "err": err}))
"""


@pytest.mark.timeout(300)
def test_avx2_build() -> None:
    result = run_avx2(CHILD)
    assert result["isa"] == "avx2" and result["equal"] and result["err"] < 1e-5


def test_other_dtypes_take_torch() -> None:
    """bfloat16 logits or a float64 temperature: torch's answer, not the kernel's refusal."""
    logits = torch.randn(2, 100)
    want = torch.topk(logits, 3, dim=-1)
    for args in ((logits, torch.ones(2, dtype=torch.float64)),
                 (logits.bfloat16(), torch.ones(2))):
        values, ids, lse, _ = top_k.top_k_lse(args[0], 3, args[1])
        assert torch.equal(ids, torch.topk(args[0], 3, dim=-1).indices)
        assert values.dtype == args[0].dtype
        torch.testing.assert_close(lse, torch.logsumexp(args[0], dim=-1))
    assert torch.equal(top_k.top_k_lse(logits, 3, torch.ones(2))[1], want.indices)
