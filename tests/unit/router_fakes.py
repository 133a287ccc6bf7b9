"""In-memory stand-ins for the shard group and the tokenizer, for engine tests without processes.

The fake model's logits are a pure function of a sequence's last three tokens, so any batch
gives the same tokens as a solo run; the vocabulary is split over the fake ranks like the real
LM head, and each rank answers only its local top-k and log-sum-exp.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

from router_svc.sampling import ShardCandidates
from router_svc.shards import SeqWork, ShardInfo, StepResult
from router_svc.tokenizer_client import DetokItem, DetokResult, TokenizerInfo
from services.errors import InvalidArgument, Unavailable

EOS = 1
TEXTS = ["<pad>", "<eos>", *"abcdefghijklmnopqrstuvwxyz", " ", "\n", ".", ",",
         "ab", "cd", "the", " the", "xy", "yz", "zz", "qu", "ick", "st", "op", "ST", "OP", "!",
         "hello", " world", "12", "34", "é", "ü", "--", "==", "<", ">", "[", "]"]
VOCAB = len(TEXTS)
CHAR_IDS = {t: i for i, t in enumerate(TEXTS) if len(t) == 1}


def fake_logits(history: Sequence[int]) -> list[float]:
    rng = random.Random(hash(tuple(history[-3:])))
    logits = [rng.gauss(0.0, 3.0) for _ in range(VOCAB)]
    logits[EOS] -= 4.0  # let sequences run a while
    return logits


def _lse(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


class FakeShards:
    def __init__(self, tp: int = 2, kv_capacity: int = 4096, page: int = 16,
                 max_context: int = 512, step_delay_s: float = 0.002) -> None:
        self.addresses = tuple(f"fake-shard-{r}:1" for r in range(tp))
        cuts = [VOCAB * r // tp for r in range(tp + 1)]
        self.ranges = list(itertools.pairwise(cuts))
        self.kv_capacity, self.page, self.max_context = kv_capacity, page, max_context
        self.step_delay_s = step_delay_s
        self.seqs: dict[int, list[int]] = {}  # seq_id → tokens in the KV cache
        self.next_step_id = 1
        self.healthy = True
        self.fail_at_step: int | None = None  # step_all raises at this step id
        self.steps: list[tuple[int, list[SeqWork]]] = []
        self.releases: list[list[int]] = []
        self.resets = 0

    def used_tokens(self) -> int:
        return sum(-(-len(t) // self.page) * self.page for t in self.seqs.values())

    async def close(self) -> None:
        pass

    async def step_all(self, step_id: int, work: Sequence[SeqWork],
                       timeout: float) -> StepResult:
        await asyncio.sleep(self.step_delay_s)
        if not self.healthy or step_id == self.fail_at_step:
            self.healthy = False
            raise Unavailable(f"shard {self.addresses[-1]} (rank 1) failed step {step_id}: "
                              "UNAVAILABLE: killed")
        if step_id != self.next_step_id:
            raise Unavailable(f"FAILED_PRECONDITION step {step_id}, expected {self.next_step_id}")
        for w in work:
            if w.prefill == (w.seq_id in self.seqs):
                raise Unavailable(f"bad work for sequence {w.seq_id}")
            self.seqs.setdefault(w.seq_id, []).extend(w.token_ids)
        if self.used_tokens() > self.kv_capacity:
            raise Unavailable("RESOURCE_EXHAUSTED: KV cache full")
        self.next_step_id += 1
        self.steps.append((step_id, list(work)))
        candidates: dict[int, list[ShardCandidates]] = {}
        for w in work:
            logits, parts = fake_logits(self.seqs[w.seq_id]), []
            t = w.temperature if w.temperature not in (0.0, 1.0) else 1.0
            for start, stop in self.ranges:
                ids = sorted(range(start, stop), key=lambda i: (-logits[i], i))[: w.top_k]
                parts.append(ShardCandidates(
                    tuple(logits[i] for i in ids), tuple(ids), _lse(logits[start:stop]),
                    _lse([v / t for v in logits[start:stop]])))
            candidates[w.seq_id] = parts
        return StepResult(candidates, self.step_delay_s, 0.0, 0.0,
                          sum(len(w.token_ids) for w in work if w.prefill))

    async def info_all(self, timeout: float) -> list[ShardInfo]:
        if not self.healthy:
            raise Unavailable("fake shard down")
        return [ShardInfo(
            address=a, model_fingerprint="fake", model_name="fake-model", tp_rank=r,
            tp_size=len(self.addresses), vocab_range=self.ranges[r], vocab_size=VOCAB,
            dtype="float32", kv_capacity_tokens=self.kv_capacity,
            kv_free_tokens=self.kv_capacity - self.used_tokens(), kv_page_size=self.page,
            max_context=self.max_context, max_top_k=1024, next_step_id=self.next_step_id)
            for r, a in enumerate(self.addresses)]

    async def health_all(self, timeout: float) -> list[bool]:
        return [self.healthy] * len(self.addresses)

    async def release_all(self, seq_ids: Sequence[int], timeout: float) -> None:
        self.releases.append(list(seq_ids))
        for s in seq_ids:
            self.seqs.pop(s, None)

    async def reset_all(self, next_step_id: int, timeout: float) -> None:
        if not self.healthy:
            raise Unavailable("fake shard down")
        self.seqs.clear()
        self.next_step_id = next_step_id
        self.resets += 1


def decode(ids: Sequence[int], skip_special: bool = True) -> str:
    return "".join(TEXTS[i] for i in ids if not (skip_special and i in (0, EOS)))


class FakeTokenizer:
    address = "fake-tokenizer:1"

    def __init__(self) -> None:
        self.detok_calls: list[list[DetokItem]] = []
        self.fail: Exception | None = None

    async def close(self) -> None:
        pass

    async def info(self, timeout: float) -> TokenizerInfo:
        return TokenizerInfo(VOCAB, None, (EOS,), (), True, "fake-model")

    async def healthy(self, timeout: float) -> bool:
        return True

    async def encode(self, prompt: str | None, messages: Sequence[tuple[str, str]] | None,
                     timeout: float) -> list[int]:
        text = prompt if prompt is not None else "".join(
            f"<{role}>{content}" for role, content in messages or ())
        if any(c not in CHAR_IDS for c in text):
            raise InvalidArgument("prompt: a character outside the fake vocabulary")
        return [CHAR_IDS[c] for c in text]

    async def detokenize(self, items: Sequence[DetokItem], timeout: float,
                         skip_special_tokens: bool = True) -> list[DetokResult]:
        await asyncio.sleep(0.001)
        if self.fail is not None:
            raise self.fail
        self.detok_calls.append(list(items))
        out = []
        for i in items:
            old = decode(i.token_ids[i.prefix_offset:i.read_offset])
            new = decode(i.token_ids[i.prefix_offset:])
            out.append(DetokResult(i.seq_id, new[len(old):], i.read_offset, len(i.token_ids)))
        return out

    async def token_texts(self, token_ids: Sequence[int], timeout: float) -> dict[int, str]:
        return {t: TEXTS[t] for t in token_ids}


@contextlib.asynccontextmanager
async def run_engine(engine: Any) -> AsyncIterator[None]:
    """Run `engine` (a router Engine) until the block ends; enter once it is serving (5 s)."""
    task = asyncio.ensure_future(engine.run())
    try:
        async with asyncio.timeout(5):
            while not engine.serving:
                await asyncio.sleep(0.001)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
