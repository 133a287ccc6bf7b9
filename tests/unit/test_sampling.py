"""Top-k merging and sampling against a brute-force full-vocabulary reference (numpy, float64)."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from router_svc.sampling import (
    DEFAULT_CANDIDATES,
    MAX_TOP_K,
    Candidates,
    SamplingParams,
    ShardCandidates,
    candidates_needed,
    distribution,
    logprobs,
    merge,
    sample,
)
from services.errors import InvalidArgument

# -- the brute-force reference ---------------------------------------------------------------


def lse(x: np.ndarray) -> float:
    return float(np.logaddexp.reduce(x)) if x.size else -math.inf


def sorted_ids(logits: np.ndarray) -> np.ndarray:
    """Token ids by logit descending, ties by lower id."""
    return np.lexsort((np.arange(logits.size), -logits))


def shard_answers(logits: np.ndarray, cuts: list[int], k: int, t: float) -> list[ShardCandidates]:
    """What each shard of a contiguous vocabulary split returns, computed independently."""
    bounds = [0, *cuts, logits.size]
    parts = []
    for start, stop in itertools.pairwise(bounds):
        local = logits[start:stop]
        top = sorted_ids(local)[:k]
        with np.errstate(over="ignore"):  # tiny temperatures: inf, as a float32 shard would
            lse_t = lse(local / t) if t not in (0.0, 1.0) else lse(local)
        parts.append(ShardCandidates(
            logits=tuple(float(x) for x in local[top]),
            token_ids=tuple(int(i) + start for i in top),
            logsumexp=lse(local),
            logsumexp_t=lse_t,
        ))
    return parts


def reference(logits: np.ndarray, params: SamplingParams) -> dict[int, float]:
    """The distribution sample() must follow, from the full logit vector, in the documented order.

    Also returns (via `reference.margin`) how close the nucleus cut came to top_p, so tests can
    skip inputs where float rounding decides which side of the cut a token falls on.
    """
    order = sorted_ids(logits)
    reference.margin = math.inf  # type: ignore[attr-defined]
    if params.temperature == 0 or params.top_k == 1:
        return {int(order[0]): 1.0}
    z = logits / params.temperature
    probs = np.exp(z - lse(z))[order]  # full-vocabulary softmax, sorted
    n = params.top_k or DEFAULT_CANDIDATES  # the truncation candidates_needed documents
    probs, order = probs[:n], order[:n]
    if params.top_k:
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        cum = np.cumsum(probs)
        reference.margin = float(np.min(np.abs(cum - params.top_p)))  # type: ignore[attr-defined]
        reached = np.nonzero(cum >= params.top_p)[0]
        keep = int(reached[0]) + 1 if reached.size else probs.size
        probs, order = probs[:keep], order[:keep]
    probs = probs / probs.sum()
    return {int(i): float(p) for i, p in zip(order, probs, strict=True)}


def setup(seed: int, vocab: int, shards: int, params: SamplingParams,
          scale: float = 3.0) -> tuple[np.ndarray, Candidates]:
    gen = np.random.default_rng(seed)
    logits = gen.normal(0.0, scale, vocab)
    cuts = sorted(gen.choice(np.arange(1, vocab), shards - 1, replace=False).tolist())
    k = candidates_needed(params)
    return logits, merge(shard_answers(logits, cuts, k, params.temperature))


# -- merging ---------------------------------------------------------------------------------

@st.composite
def split_vocab(draw: st.DrawFn) -> tuple[np.ndarray, list[int], int, float]:
    vocab = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    logits = np.random.default_rng(seed).normal(0.0, draw(st.sampled_from([0.1, 2.0, 20.0])), vocab)
    if draw(st.booleans()):  # coarse values make ties, broken by lower token id
        logits = np.round(logits)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, vocab - 1)), max_size=min(7, vocab - 1))))
    k = draw(st.integers(1, 80))
    t = draw(st.sampled_from([0.0, 0.3, 1.0, 1.7]))
    return logits, cuts, k, t


@settings(max_examples=200, deadline=None)
@given(split_vocab())
def test_merge_is_exact_global_top_k_with_exact_probabilities(
        case: tuple[np.ndarray, list[int], int, float]) -> None:
    logits, cuts, k, t = case
    c = merge(shard_answers(logits, cuts, k, t))
    expected = sorted_ids(logits)[:k]
    assert list(c.token_ids[:k]) == expected.tolist()
    assert list(c.logits) == sorted(c.logits, reverse=True)
    full = np.exp(logits - lse(logits))
    np.testing.assert_allclose(np.exp(logprobs(c)), full[list(c.token_ids)], rtol=1e-12)
    assert c.logsumexp == pytest.approx(lse(logits), rel=1e-12, abs=1e-12)
    z = logits / t if t not in (0.0, 1.0) else logits
    assert c.logsumexp_t == pytest.approx(lse(z), rel=1e-12, abs=1e-12)


def test_merge_breaks_ties_by_lower_token_id() -> None:
    a = ShardCandidates((2.0, 1.0), (7, 8), 3.0, 3.0)
    b = ShardCandidates((2.0, 1.0), (3, 9), 3.0, 3.0)
    assert merge([a, b]).token_ids == (3, 7, 8, 9)
    assert merge([b, a]).token_ids == (3, 7, 8, 9)


def test_merge_refuses_malformed_answers() -> None:
    with pytest.raises(ValueError, match="2 logits but 1 token ids"):
        ShardCandidates((1.0, 0.0), (1,), 0.0, 0.0)
    with pytest.raises(ValueError, match="overlapping"):
        merge([ShardCandidates((1.0,), (5,), 1.0, 1.0)] * 2)
    with pytest.raises(ValueError, match="at least one"):
        merge([])


# -- sampling --------------------------------------------------------------------------------

COMBOS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.5, top_k=12, top_p=0.9),
    SamplingParams(temperature=2.0, top_k=40, top_p=0.6),
]


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), vocab=st.integers(2, 200), shards=st.integers(1, 4),
       t=st.sampled_from([0.0, 0.05, 0.6, 1.0, 1.5, 10.0]), top_k=st.integers(0, 70),
       top_p=st.sampled_from([1.0, 0.99, 0.9, 0.5, 0.1, 1e-6]))
def test_distribution_equals_brute_force(seed: int, vocab: int, shards: int, t: float,
                                         top_k: int, top_p: float) -> None:
    params = SamplingParams(temperature=t, top_k=top_k, top_p=top_p)
    logits, c = setup(seed, vocab, min(shards, vocab), params)
    ref = reference(logits, params)
    assume(reference.margin > 1e-9)  # type: ignore[attr-defined]
    if params.greedy:
        assert sample(c, params, random.Random(0)) == next(iter(ref))
        return
    ids, probs = distribution(c, params)
    assert list(ids) == list(ref)
    np.testing.assert_allclose(probs, list(ref.values()), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("params", COMBOS, ids=repr)
def test_draws_follow_the_reference_distribution(params: SamplingParams) -> None:
    logits, c = setup(1234, 40, 3, params, scale=1.0)
    ref = reference(logits, params)
    n = 20_000
    rng = random.Random(99)
    counts: dict[int, int] = {}
    for _ in range(n):
        tok = sample(c, params, rng)
        counts[tok] = counts.get(tok, 0) + 1
    assert set(counts) <= set(ref)  # nothing outside the support is ever drawn
    chi2 = sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in ref.items())
    dof = max(1, len(ref) - 1)
    assert chi2 < dof + 6 * math.sqrt(2 * dof) + 10, (chi2, dof)
    tv = 0.5 * sum(abs(counts.get(i, 0) / n - p) for i, p in ref.items())
    assert tv < 0.03


def test_matches_hugging_face_warpers() -> None:
    """The order and cut rules are Hugging Face's (vocabulary within DEFAULT_CANDIDATES)."""
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    for seed, params in enumerate(COMBOS * 4):
        logits, c = setup(seed, DEFAULT_CANDIDATES, 3, params)
        scores = torch.tensor(logits, dtype=torch.float64)[None]
        scores = lp.TemperatureLogitsWarper(params.temperature)(None, scores)
        if params.top_k:
            scores = lp.TopKLogitsWarper(params.top_k)(None, scores)
        if params.top_p < 1.0:
            scores = lp.TopPLogitsWarper(params.top_p)(None, scores)
        hf = torch.softmax(scores, dim=-1)[0].numpy()
        ids, probs = distribution(c, params)
        assert set(ids) == set(np.nonzero(hf)[0].tolist())
        np.testing.assert_allclose(probs, hf[list(ids)], rtol=1e-9)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), t=st.floats(0.0, 5.0), top_p=st.floats(0.01, 1.0))
def test_top_k_1_and_temperature_0_are_greedy(seed: int, t: float, top_p: float) -> None:
    gen = np.random.default_rng(seed)
    logits = np.round(gen.normal(0, 2, 50))  # ties: the lower id wins
    greedy = int(sorted_ids(logits)[0])
    for params in (SamplingParams(temperature=t, top_k=1, top_p=top_p),
                   SamplingParams(temperature=0.0, top_k=seed % 10, top_p=top_p)):
        c = merge(shard_answers(logits, [17, 30], candidates_needed(params), params.temperature))
        assert candidates_needed(params) == 1
        assert sample(c, params, random.Random(seed)) == greedy


def test_same_seed_same_draws_and_one_random_call_per_token() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    _, c = setup(5, 500, 4, params, scale=1.0)
    draws = [[sample(c, params, rng) for _ in range(50)]
             for rng in (random.Random(params.seed), random.Random(params.seed))]
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 5
    other = random.Random(8)
    assert [sample(c, params, other) for _ in range(50)] != draws[0]
    rng, twin = random.Random(3), random.Random(3)
    sample(c, params, rng)
    twin.random()
    assert rng.getstate() == twin.getstate()


def test_extreme_temperatures_stay_finite() -> None:
    c = merge(shard_answers(np.array([3.0, 2.9, -1.0, 5.0]), [2], 4, 1e-300))
    assert sample(c, SamplingParams(temperature=1e-300), random.Random(0)) == 3
    c = merge(shard_answers(np.array([3.0, 2.9, -1.0, 5.0]), [2], 4, 1e300))
    _, probs = distribution(c, SamplingParams(temperature=1e300))
    np.testing.assert_allclose(probs, [0.25] * 4)


def test_candidates_needed() -> None:
    assert candidates_needed(SamplingParams(temperature=0.0, top_k=50)) == 1
    assert candidates_needed(SamplingParams(top_k=1)) == 1
    assert candidates_needed(SamplingParams(top_k=20, top_p=0.5)) == 20
    assert candidates_needed(SamplingParams(top_p=0.5)) == DEFAULT_CANDIDATES
    assert candidates_needed(SamplingParams()) == DEFAULT_CANDIDATES


@pytest.mark.parametrize(("field", "kwargs"), [
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": math.nan}),
    ("temperature", {"temperature": math.inf}),
    ("temperature", {"temperature": "1"}),
    ("top_k", {"top_k": -1}),
    ("top_k", {"top_k": 2.0}),
    ("top_k", {"top_k": True}),
    ("top_k", {"top_k": MAX_TOP_K + 1}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.01}),
    ("top_p", {"top_p": math.nan}),
    ("top_p", {"top_p": -0.5}),
    ("seed", {"seed": 1.5}),
    ("seed", {"seed": "7"}),
])
def test_validation_names_the_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]
