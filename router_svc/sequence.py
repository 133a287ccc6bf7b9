"""One request's state in the engine: its tokens, sampler, stop checks, detokenizer offsets and the
queue of chunks its stream reads.

Per step, the engine calls `work` (what to send the shards), `accept` (the merged candidates:
sample the next token, check token stops), `detok_item` (what to detokenize) and `apply_detok`
(the new text: check stop strings, build this step's chunk). A stop decided at a token waits for
its text; a stop string, a cancel or an error ends at once (the latter two overriding a stop whose
text is still on the way). The chunk carrying the finish is the last, with the usage. Text is
streamed only after `StopChecker.feed` has cleared it, so a stop string is never sent.

`status` is the engine's to set, and `Engine._end` is the one place a sequence ends.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum

from router_svc.request import GenerateRequest
from router_svc.sampling import Candidates, candidates_needed, logprobs, sample
from router_svc.shards import SeqWork
from router_svc.stops import Finish, FinishReason, StopChecker, stop_string_finish
from router_svc.tokenizer_client import DetokItem, DetokResult
from services.errors import CpumeshError
from services.limits import MAX_TOP_K

DETOK_PROMPT_CONTEXT = 5  # prompt tokens sent as context to the first detokenization


class SeqStatus(Enum):
    """Where a sequence is. The engine sets it: RUNNING when its prompt is sent, FINISHING and
    FINISHED only in `Engine._end`."""

    WAITING = "waiting"  # queued (first, or again after a preemption): the shards hold none of it
    RUNNING = "running"  # its prompt was sent: it is in every step; the shards hold its KV
    FINISHING = "finishing"  # stopped at a token (stop, EOS, length): its last text on the way
    FINISHED = "finished"  # its last chunk was pushed; `finish` says how it ended


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    text: str


@dataclass(frozen=True)
class PositionLogprobs:
    token: TokenLogprob
    top: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    total_s: float


@dataclass(frozen=True)
class Chunk:
    """One streamed response; the last one has `finish` (and `error` when it failed)."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[PositionLogprobs, ...] = ()
    finish: Finish | None = None
    stop_string: str | None = None
    stop_token_id: int | None = None
    usage: Usage | None = None
    error: CpumeshError | None = None


class Sequence:
    def __init__(self, seq_id: int, request_id: str, request: GenerateRequest,
                 prompt_ids: list[int], max_new_tokens: int, eos_token_ids: tuple[int, ...],
                 arrival: float, length_detail: str | None = None,
                 max_top_k: int = MAX_TOP_K) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.generated: list[int] = []
        self.params = request.sampling_params()
        self.seed = self.params.seed if self.params.seed is not None \
            else random.SystemRandom().getrandbits(64)
        self.rng = random.Random(self.seed)
        self.stops = StopChecker(request.stop, request.stop_token_ids, eos_token_ids,
                                 request.ignore_eos, max_new_tokens)
        self.length_detail = length_detail  # replaces "max_new_tokens N reached" when defaulted
        self.top_logprobs = request.top_logprobs if request.logprobs else -1  # -1: no logprobs
        self.top_k = min(max_top_k, max(candidates_needed(self.params), self.top_logprobs))
        self.temperature = 0.0 if self.params.greedy else self.params.temperature
        self.queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self.arrival = arrival
        self.first_token_at: float | None = None
        self.status = SeqStatus.WAITING
        self.finish: Finish | None = None  # decided; its chunk may still be on the way
        self.stop_token_id: int | None = None
        self.joined_step = self.left_step = -1
        self._pending: list[int] = []  # sampled, not streamed yet
        self._pending_logprobs: list[tuple[tuple[int, float], list[tuple[int, float]]]] = []
        self._prefix = max(0, len(prompt_ids) - DETOK_PROMPT_CONTEXT)  # absolute positions
        self._read = len(prompt_ids)
        self._window_start = self._prefix

    @property
    def prefilled(self) -> bool:
        """A step carrying its prompt was sent."""
        return self.joined_step >= 0

    # -- shard step -----------------------------------------------------------------------------

    def prefill_ids(self) -> tuple[int, ...]:
        """What its prefill carries: the prompt, and after a preemption every token since."""
        return (*self.prompt_ids, *self.generated)

    def work(self) -> SeqWork:
        if self.status is SeqStatus.WAITING:  # after a preemption: every token so far
            return SeqWork(self.seq_id, self.prefill_ids(), True, self.top_k, self.temperature)
        return SeqWork(self.seq_id, (self.generated[-1],), False, self.top_k, self.temperature)

    def accept(self, candidates: Candidates, now: float) -> None:
        """Sample the next token from the merged candidates; decide a token or length stop."""
        token = sample(candidates, self.params, self.rng)
        if self.top_logprobs >= 0:
            lps = logprobs(candidates)
            chosen = (token, lps[candidates.token_ids.index(token)])
            top = list(zip(candidates.token_ids[: self.top_logprobs], lps, strict=False))
            self._pending_logprobs.append((chosen, top))
        self.generated.append(token)
        self._pending.append(token)
        if self.first_token_at is None:
            self.first_token_at = now
        finish = self.stops.check_token(token, len(self.generated))
        if finish is not None:
            if finish.reason is FinishReason.STOP:
                self.stop_token_id = token
            elif self.length_detail is not None:
                finish = Finish(finish.reason, self.length_detail)
            self.finish = finish

    # -- text -----------------------------------------------------------------------------------

    def detok_item(self) -> DetokItem | None:
        """The window to detokenize after this step (a stop token's own text is left out)."""
        ids = [*self.prompt_ids, *self.generated]
        end = len(ids) - (self.stop_token_id is not None)
        flush = self.finish is not None
        if end <= self._read and not flush:
            return None
        self._window_start = self._prefix
        return DetokItem(self.seq_id, tuple(ids[self._prefix:end]), 0,
                         self._read - self._prefix, flush)

    def logprob_token_ids(self) -> list[int]:
        return [t for chosen, top in self._pending_logprobs for t, _ in [chosen, *top]]

    def apply_detok(self, result: DetokResult | None, texts: Mapping[int, str]) -> Chunk:
        """This step's chunk: its tokens and the text they add (the last one if `finish` is
        set after it: a stop string matched now, or a stop decided at a token)."""
        delta = ""
        if result is not None:
            delta = result.text
            self._prefix = self._window_start + result.prefix_offset
            self._read = self._window_start + result.read_offset
        text, matched = self.stops.feed(delta)
        stop_string = None
        if matched is not None:
            self.finish, self.stop_token_id = stop_string_finish(matched), None
            stop_string = matched
        elif self.finish is not None:
            text += self.stops.flush()
        chunk = Chunk(text=text, token_ids=tuple(self._pending), logprobs=tuple(
            PositionLogprobs(TokenLogprob(t, lp, texts.get(t, "")),
                             tuple(TokenLogprob(a, alp, texts.get(a, "")) for a, alp in top))
            for (t, lp), top in self._pending_logprobs), stop_string=stop_string)
        self._pending.clear()
        self._pending_logprobs.clear()
        return chunk

    # -- the stream -----------------------------------------------------------------------------

    def push(self, chunk: Chunk) -> None:
        self.queue.put_nowait(chunk)

    def last_chunk(self, chunk: Chunk, now: float, finish: Finish | None = None) -> Chunk:
        """`chunk` made the last: with the finish (`finish` replaces one decided earlier), the
        stop token that caused it, and the usage."""
        if finish is not None:
            self.finish, self.stop_token_id = finish, None
        assert self.finish is not None
        if self.finish.reason is FinishReason.STOP and chunk.stop_string is None:
            chunk = replace(chunk, stop_token_id=self.stop_token_id)
        return replace(chunk, finish=self.finish, usage=self.usage(now))

    def usage(self, now: float) -> Usage:
        ttft = (self.first_token_at - self.arrival) if self.first_token_at is not None else 0.0
        return Usage(len(self.prompt_ids), len(self.generated), ttft, now - self.arrival)
