"""The shard engine: validates a step, runs the sliced forward, returns each sequence's top-k.

It knows nothing of gRPC. A step that is refused changes nothing; a step that fails midway (the
mesh broke) is rolled back, so that the router's Reset brings every shard to the same state.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.limits import MAX_TOP_K
from shard_svc.compiled_step import CompiledDecode
from shard_svc.kv_cache import KVCache
from shard_svc.mesh.communicator import MeshError
from shard_svc.model import Batch, ShardModel, make_batch


@dataclass(frozen=True)
class SeqWork:
    """One sequence's part of a step: a prefill (its prompt) or an extension (one token)."""

    seq_id: int
    token_ids: tuple[int, ...]
    prefill: bool
    top_k: int = 1
    temperature: float = 1.0  # for logsumexp_t; 0 means greedy (logsumexp_t = logsumexp)


@dataclass(frozen=True)
class SeqTopK:
    seq_id: int
    logits: tuple[float, ...]  # this shard's k best logits, best first
    token_ids: tuple[int, ...]  # their global token ids
    logsumexp: float  # log-sum-exp over this shard's vocabulary slice
    logsumexp_t: float  # the same of logits / temperature
    cached_tokens: int = 0  # a prefill's first tokens found in the prefix cache


@dataclass(frozen=True)
class StepOutput:
    step_id: int
    results: tuple[SeqTopK, ...]
    compute_s: float
    allreduce_s: float


class ShardEngine:
    def __init__(self, model: ShardModel, cache: KVCache, max_context: int | None = None,
                 compiled: CompiledDecode | None = None) -> None:
        self.model = model
        self.cache = cache
        self.compiled = compiled  # decode steps it accepts run compiled (--compile decode)
        self.max_context = max_context or model.config.max_position_embeddings
        self.next_step_id = 1
        self._lock = threading.Lock()
        self._ones_by_rows: dict[int, torch.Tensor] = {}

    def step(self, step_id: int, work: Sequence[SeqWork]) -> StepOutput:
        with self._lock:
            self._validate(step_id, work)
            t0, ar0 = time.perf_counter(), self.model.comm.elapsed_s
            batch = make_batch([(w.seq_id, w.token_ids) for w in work], self.cache)
            try:
                logits = self._logits(batch)  # [B, V]: this rank's vocabulary slice
                results = self._top_k(logits, work, batch.reservation.cached)
            except MeshError as e:
                batch.reservation.undo()
                raise Unavailable(f"step {step_id} failed: {e}") from e
            except BaseException:
                batch.reservation.undo()
                raise
            batch.reservation.commit()
            self.next_step_id = step_id + 1
            total = time.perf_counter() - t0
            allreduce = self.model.comm.elapsed_s - ar0
            return StepOutput(step_id, results, total - allreduce, allreduce)

    def _logits(self, batch: Batch) -> torch.Tensor:
        if self.compiled is not None and self.compiled.accepts(batch, self.cache):
            logits = self.compiled.logits(batch, self.cache)
            if logits is not None:
                return logits
        return self.model.local_logits(self.model.forward(batch, self.cache))

    def release(self, seq_ids: Sequence[int]) -> int:
        """Free sequences (unknown ids are ignored); return the tokens freed."""
        with self._lock:
            return sum(self.cache.release(s) for s in seq_ids)

    def reset(self, next_step_id: int | None = None) -> None:
        with self._lock:
            self.cache.reset()
            if next_step_id is not None:
                self.next_step_id = next_step_id

    def _top_k(self, logits: torch.Tensor, work: Sequence[SeqWork],
               cached: Sequence[int]) -> tuple[SeqTopK, ...]:
        k = max(w.top_k for w in work)
        temperatures = [w.temperature or 1.0 for w in work]
        temperature = (self._ones(len(work)) if all(t == 1.0 for t in temperatures)
                       else torch.tensor(temperatures))
        # as Python numbers at once: a tensor op per row costs more than the top k itself
        values, ids, lse, lse_t = (t.tolist() for t in self.model.top_k(logits, k, temperature))
        return tuple(
            SeqTopK(w.seq_id, tuple(values[i][:w.top_k]), tuple(ids[i][:w.top_k]), lse[i],
                    lse_t[i], cached[i])
            for i, w in enumerate(work)
        )

    def _ones(self, n: int) -> torch.Tensor:
        """Temperatures of n greedy or plain-sampled rows, made once per n: a small tensor made
        in a step costs ~50 us (the weights' stream has just left the caches cold)."""
        if n not in self._ones_by_rows:
            self._ones_by_rows[n] = torch.ones(n)
        return self._ones_by_rows[n]

    def _validate(self, step_id: int, work: Sequence[SeqWork]) -> None:
        if step_id != self.next_step_id:
            raise FailedPrecondition(
                f"step id {step_id} out of order: expected {self.next_step_id}")
        if not work:
            raise InvalidArgument("a step needs at least one sequence")
        vocab = self.model.config.vocab_size
        seen: set[int] = set()
        for w in work:
            if w.seq_id in seen:
                raise InvalidArgument(f"sequence {w.seq_id} appears twice in step {step_id}")
            seen.add(w.seq_id)
            if w.prefill:
                if w.seq_id in self.cache:
                    raise InvalidArgument(f"prefill for sequence {w.seq_id}, which already exists")
                if not w.token_ids:
                    raise InvalidArgument(f"prefill for sequence {w.seq_id} has no tokens")
                cached = 0
            else:
                if w.seq_id not in self.cache:
                    raise NotFound(f"unknown sequence {w.seq_id}")
                if len(w.token_ids) != 1:
                    raise InvalidArgument(
                        f"sequence {w.seq_id}: an extension carries exactly one token, "
                        f"got {len(w.token_ids)}")
                cached = self.cache.length(w.seq_id)
            if cached + len(w.token_ids) > self.max_context:
                raise InvalidArgument(
                    f"sequence {w.seq_id}: position {cached + len(w.token_ids) - 1} is beyond "
                    f"the model's context of {self.max_context} tokens")
            bad = [t for t in w.token_ids if not 0 <= t < vocab]
            if bad:
                raise InvalidArgument(
                    f"sequence {w.seq_id}: token id {bad[0]} outside the vocabulary 0..{vocab - 1}")
            if not (w.temperature >= 0 and math.isfinite(w.temperature)):
                raise InvalidArgument(
                    f"sequence {w.seq_id}: temperature must be >= 0, got {w.temperature}")
            if not 1 <= w.top_k <= MAX_TOP_K:
                raise InvalidArgument(
                    f"sequence {w.seq_id}: top_k must be in 1..{MAX_TOP_K}, got {w.top_k}")
        self.cache.check_room([(w.seq_id, w.token_ids) for w in work])
