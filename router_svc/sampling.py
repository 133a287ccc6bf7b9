"""Top-k merging and sampling at the router: small pure functions over the shards' candidates.

Each shard owns a contiguous slice of the vocabulary and answers, per sequence, its k best
(logit, global token id) pairs plus the log-sum-exp of its whole slice, once of the logits and once
of the logits divided by the sequence's temperature. That is enough to merge exactly: the global
top-k is the top-k of the union of the local top-ks, and the global log-sum-exp is the log-sum-exp
of the slices' log-sum-exps, so every candidate's full-vocabulary probability is exact although the
full logits never leave the shards.

Sampling follows Hugging Face's order (temperature, then top-k, then top-p) and draws with one
`rng.random()` per token, so a seeded `random.Random` reproduces a generation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from services.errors import InvalidArgument
from services.limits import MAX_TOP_K

DEFAULT_CANDIDATES = 64  # candidates per shard for top-p or plain temperature sampling


@dataclass(frozen=True)
class ShardCandidates:
    """One shard's answer for one sequence: its local top-k, best first, and its slice's LSEs."""

    logits: tuple[float, ...]
    token_ids: tuple[int, ...]
    logsumexp: float  # log-sum-exp of the slice's logits
    logsumexp_t: float  # log-sum-exp of the slice's logits / temperature

    def __post_init__(self) -> None:
        if len(self.logits) != len(self.token_ids):
            raise ValueError(f"a shard returned {len(self.logits)} logits "
                             f"but {len(self.token_ids)} token ids")


@dataclass(frozen=True)
class Candidates:
    """The merged candidates of one sequence, by logit descending (ties: lower token id first)."""

    token_ids: tuple[int, ...]
    logits: tuple[float, ...]
    logsumexp: float  # over the whole vocabulary
    logsumexp_t: float  # over the whole vocabulary, of logits / temperature


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if math.isinf(top):
        return top  # all -inf (an empty slice), or +inf
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def merge(parts: Sequence[ShardCandidates]) -> Candidates:
    """Merge the shards' answers for one sequence, exactly.

    The first n merged candidates are the exact global top-n whenever every shard returned at
    least n candidates (or its whole slice). Token ids must be distinct across shards.
    """
    if not parts:
        raise ValueError("merge needs at least one shard's candidates")
    pairs = [(logit, tid) for p in parts for logit, tid in zip(p.logits, p.token_ids, strict=True)]
    pairs.sort(key=lambda pair: (-pair[0], pair[1]))
    if len({tid for _, tid in pairs}) != len(pairs):
        raise ValueError("shards returned overlapping token ids")
    return Candidates(
        token_ids=tuple(tid for _, tid in pairs),
        logits=tuple(logit for logit, _ in pairs),
        logsumexp=_logsumexp([p.logsumexp for p in parts]),
        logsumexp_t=_logsumexp([p.logsumexp_t for p in parts]),
    )


def logprobs(c: Candidates) -> list[float]:
    """Exact full-vocabulary log-probabilities (temperature 1) of the candidates, in order."""
    return [logit - c.logsumexp for logit in c.logits]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 (or top_k 1) is greedy; top_k 0 is off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {t!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_K:
            raise InvalidArgument(f"top_k must be an integer in [0, {MAX_TOP_K}] "
                                  f"(0 = off), got {k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {p!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int)):
            raise InvalidArgument(f"seed must be an integer or unset, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def candidates_needed(params: SamplingParams) -> int:
    """How many candidates each shard must return for `params`.

    * greedy (temperature 0 or top_k 1): 1, and sampling is exact;
    * top_k set: top_k, and sampling is exact (top-p, if also set, applies within the top-k);
    * otherwise (top_p and/or plain temperature): DEFAULT_CANDIDATES. This is the trade-off of
      returning only the top-k from the shards: nucleus sampling is exact when the nucleus lies
      within the top DEFAULT_CANDIDATES tokens and is truncated to them otherwise, and plain
      temperature sampling (no top_k, no top_p) samples among those candidates only, i.e. the
      probability mass of the rest of the vocabulary is redistributed over them. The
      probabilities used for the nucleus cut are still exact full-vocabulary ones.
    """
    if params.greedy:
        return 1
    return params.top_k or DEFAULT_CANDIDATES


def sample(c: Candidates, params: SamplingParams, rng: random.Random) -> int:
    """The next token id: greedy, or one draw from the temperature/top-k/top-p distribution.

    Only the first `candidates_needed(params)` merged candidates are considered, so the outcome
    does not depend on how many shards the vocabulary is split over.
    """
    if not c.token_ids:
        raise ValueError("no candidates to sample from")
    if params.greedy:
        return c.token_ids[0]
    ids, weights = distribution(c, params)
    return ids[_draw(weights, rng)]


def distribution(c: Candidates, params: SamplingParams) -> tuple[tuple[int, ...], list[float]]:
    """The token ids `sample` may draw and their probabilities (summing to 1), for sampling."""
    n = candidates_needed(params)
    probs = _temperature_probs(c.logits[:n], c.logsumexp_t, params.temperature)
    if params.top_k:
        probs = _normalized(probs[: params.top_k])
    probs = _normalized(_nucleus(probs, params.top_p))
    return c.token_ids[: len(probs)], probs


def _temperature_probs(logits: Sequence[float], logsumexp_t: float, t: float) -> list[float]:
    """Full-vocabulary probabilities exp(l / T - logsumexp_t) of logits sorted descending.

    Computed as exp((l - l0) / T) * exp(l0 / T - logsumexp_t), which cannot overflow for any
    temperature. In exact arithmetic 1/V <= p0 <= 1; the clamp only guards the first weight
    against a shard's rounding (or a NaN from an extreme temperature) so it stays positive.
    """
    top = logits[0]
    log_p0 = top / t - logsumexp_t
    p0 = 1.0 if math.isnan(log_p0) else math.exp(min(max(log_p0, -700.0), 0.0))
    return [math.exp((logit - top) / t) * p0 for logit in logits]


def _nucleus(probs: list[float], top_p: float) -> list[float]:
    """The smallest prefix whose cumulative probability reaches top_p (all of it if none does)."""
    if top_p >= 1.0:
        return probs
    total = 0.0
    for i, p in enumerate(probs):
        total += p
        if total >= top_p:
            return probs[: i + 1]
    return probs


def _normalized(probs: list[float]) -> list[float]:
    total = math.fsum(probs)
    return [p / total for p in probs]


def _draw(probs: Sequence[float], rng: random.Random) -> int:
    """Index i with probability probs[i], from exactly one rng.random() call."""
    u = rng.random()
    total = 0.0
    for i, p in enumerate(probs):
        total += p
        if u < total:
            return i
    # u fell into the rounding gap above the last cumulative sum: the last possible token
    return max(i for i, p in enumerate(probs) if p > 0)
