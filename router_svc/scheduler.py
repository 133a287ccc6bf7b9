"""Continuous batching: which requests prefill and which decode at each engine step.

Pure bookkeeping, no I/O: the engine calls `submit` as requests arrive, `schedule` once per step,
and `finish` when a sequence ends (stop, length, error or client cancel). Calling `schedule` again
means the previous plan's step completed, so the requests it prefilled now decode.

KV accounting, in whole pages of one shard (every shard holds every sequence):

* `on_demand` (the default, as vLLM and TGI): a running sequence holds the pages its tokens fill,
  ceil(length / page), and gains them as it grows. A waiting request is admitted while its
  prompt and one more token fit the free pages. When the running sequences' next tokens need more
  pages than are free, the newest running sequences are preempted: the plan lists them, the
  engine releases them on the shards (in the plan's order), and they go back to the front of the
  queue to be recomputed from their tokens (prompt and generated so far). No request ever fails
  for lack of KV.
* Given `pages`, a replica of the shards' page table (services/page_table.py, their very code)
  fed the steps and releases they get (`step_sent`, `step_ran`, `release`; `schedule` releases
  the sequences it preempts), free pages are the shards' own: a page shared through their prefix
  cache counts once, and a prompt's cached blocks cost no page (but an unheld one stops being
  free) and no prefill budget, as the shard counts them. Without it, no page is shared.
* `full` (the behaviour before on-demand pages, kept to measure against): an admitted request
  reserves the pages of its prompt and all of its max_new_tokens up front; nothing is preempted.

Either way a request whose prompt + max_new_tokens can never fit the whole cache is refused at
`submit`. The router's capacity is rounded down to whole pages, so it never promises more than a
shard holds (a shard rounds up).

The waiting queue's bound counts requests being tokenized: the engine takes a slot with
`reserve_waiting` before tokenizing, and `submit(reserved=True)` takes it (or
`unreserve_waiting` gives it back), so a burst's excess is refused before it is tokenized.

Admission is strictly FIFO: the head of the queue is admitted as soon as it fits and no request
behind it overtakes it, so a large request cannot be starved by a stream of small ones. Every
accepted request fits the empty cache (checked at `submit`), and the oldest running request is
never preempted, so the head is always admitted eventually.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from services.errors import InvalidArgument, ResourceExhausted
from services.page_table import PageReservation, PageTable

KV_RESERVATIONS = ("on_demand", "full")


@dataclass(frozen=True)
class SchedulerConfig:
    kv_capacity_tokens: int  # KV slots of one shard (every shard holds all sequences' tokens)
    kv_page_size: int = 16  # tokens per KV page, as the shards' cache
    max_waiting: int = 256  # queued requests beyond which submit fails with RESOURCE_EXHAUSTED
    max_running: int = 64  # sequences in the batch at once
    prefill_token_budget: int = 2048  # prompt tokens prefilled per step (one longer prompt alone)
    kv_reservation: str = "on_demand"  # or "full": prompt + max_new_tokens reserved at admission

    def __post_init__(self) -> None:
        for name in ("kv_capacity_tokens", "kv_page_size", "max_waiting", "max_running",
                     "prefill_token_budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.kv_capacity_tokens < self.kv_page_size:
            raise ValueError(f"kv_capacity_tokens ({self.kv_capacity_tokens}) must hold at least "
                             f"one page of kv_page_size ({self.kv_page_size}) tokens")
        if self.kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"kv_reservation must be one of {KV_RESERVATIONS}, got "
                             f"{self.kv_reservation!r}")

    @property
    def kv_capacity_pages(self) -> int:
        return self.kv_capacity_tokens // self.kv_page_size


@dataclass(frozen=True)
class StepPlan:
    prefill: tuple[int, ...]  # admitted this step, in FIFO order: run their prompts
    decode: tuple[int, ...]  # running and prefilled: extend by one token
    preempted: tuple[int, ...] = ()  # were running: release them, then recompute them later

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


@dataclass
class _Request:
    prompt_len: int  # tokens its prefill carries (after a preemption: prompt + generated)
    max_new_tokens: int
    reserved: int  # kv_reservation full: the pages reserved at admission
    length: int = 0  # running: tokens in the shards' cache once the planned step ran


class Scheduler:
    def __init__(self, config: SchedulerConfig, pages: PageTable | None = None,
                 prefill_ids: Callable[[int], Seq[int]] | None = None) -> None:
        """`pages`: the replica of the shards' page table (see above), with `prefill_ids`,
        the token ids a request's prefill would carry now."""
        if pages is not None and (prefill_ids is None or (pages.num_pages, pages.page_size)
                                  != (config.kv_capacity_pages, config.kv_page_size)):
            raise ValueError("a page table of the config's pages comes with prefill_ids")
        self.config = config
        self._pages, self._prefill_ids = pages, prefill_ids
        self._step: PageReservation | None = None  # the step in flight, in `pages`
        self._on_demand = config.kv_reservation == "on_demand"
        # On demand, pages kept free when admitting beside running requests, so that their
        # growth does not preempt a request just admitted (as vLLM's 1 % watermark).
        self._watermark = config.kv_capacity_pages // 100 if self._on_demand else 0
        self._waiting: dict[int, _Request] = {}  # insertion order is FIFO order
        self._running: dict[int, _Request] = {}  # insertion order is admission order
        self._reserved_waiting = 0  # waiting slots taken by requests being tokenized
        self.preemptions = 0  # sequences preempted so far

    # -- requests -------------------------------------------------------------------------------

    def reserve_waiting(self) -> None:
        """Take a waiting slot for a request about to be tokenized, or ResourceExhausted."""
        if len(self._waiting) + self._reserved_waiting >= self.config.max_waiting:
            raise ResourceExhausted(f"waiting queue full ({self.config.max_waiting} requests)")
        self._reserved_waiting += 1

    def unreserve_waiting(self) -> None:
        """Give back a slot of `reserve_waiting` that `submit` did not take."""
        if self._reserved_waiting < 1:
            raise ValueError("no waiting slot is reserved")
        self._reserved_waiting -= 1

    def submit(self, request_id: int, prompt_len: int, max_new_tokens: int,
               reserved: bool = False) -> None:
        """Queue a request, or refuse it at once (nothing changes on refusal: a reserved slot
        stays reserved). `reserved`: it takes a slot of `reserve_waiting`."""
        if prompt_len < 1:
            raise InvalidArgument(f"the prompt must have at least 1 token, got {prompt_len}")
        if max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if request_id in self._waiting or request_id in self._running:
            raise ValueError(f"request {request_id} is already scheduled")
        pages = self._pages_of(prompt_len + max_new_tokens)
        if pages > self.config.kv_capacity_pages:
            raise InvalidArgument(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
                f"{prompt_len + max_new_tokens} tokens can never fit the KV cache "
                f"({self.kv_capacity_tokens} tokens)")
        if reserved and self._reserved_waiting < 1:
            raise ValueError("submit(reserved=True) without a reserved waiting slot")
        if len(self._waiting) + self._reserved_waiting - reserved >= self.config.max_waiting:
            raise ResourceExhausted(f"waiting queue full ({self.config.max_waiting} requests)")
        self._waiting[request_id] = _Request(prompt_len, max_new_tokens, pages)
        self._reserved_waiting -= reserved

    def finish(self, request_id: int) -> bool:
        """Forget a request, waiting or running, and free its pages. Idempotent: returns
        whether it was known."""
        if self._waiting.pop(request_id, None) is not None:
            return True
        return self._running.pop(request_id, None) is not None

    def abort_all(self) -> list[int]:
        """Forget every request (after a failed step); returns their ids, running ones first."""
        ids = [*self._running, *self._waiting]
        self._running.clear()
        self._waiting.clear()
        if self._pages is not None:
            self._pages.reset()
        return ids

    # -- the shards' page table (given `pages`) ---------------------------------------------

    def release(self, request_ids: Iterable[int]) -> None:
        """The shards release these (ended) sequences now, in this order."""
        for request_id in request_ids if self._pages is not None else ():
            self._pages.release(request_id)  # type: ignore[union-attr]

    def step_sent(self, work: Seq[tuple[int, Seq[int]]]) -> None:
        """The step's (seq_id, token ids), in the order sent to the shards."""
        if self._pages is not None:
            self._step = self._pages.reserve(work)

    def step_ran(self) -> None:
        """The step sent last ran on every shard: the blocks it filled are cached."""
        if self._step is not None:
            self._step.commit()
            self._step = None

    # -- steps ----------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """The next step: every running request decodes (on demand, the newest are preempted
        first while their next tokens would not fit); waiting ones are admitted in FIFO order
        while a batch slot, the free pages and the prefill token budget allow (the first
        admission of a step ignores the budget, so a prompt longer than it still runs alone).
        The budget counts the tokens to compute: a prompt's cached blocks are not."""
        preempted = self._preempt() if self._on_demand else ()
        free = self._free_pages() - sum(self._growth(r.length) for r in self._running.values())
        for request in self._running.values():
            request.length += 1  # each decodes one token in this step
        decode = tuple(self._running)
        prefill: list[int] = []
        budget_left = self.config.prefill_token_budget
        taken: set[int] = set()  # unheld cached pages the admitted prefills take
        while self._waiting and len(self._running) < self.config.max_running:
            request_id, request = next(iter(self._waiting.items()))
            pages, cached, unheld = self._admission(request_id, request, taken)
            room = free - (self._watermark if self._running else 0)
            computed = request.prompt_len - cached
            if pages > room or (prefill and computed > budget_left):
                break
            del self._waiting[request_id]
            self._running[request_id] = request
            request.length = request.prompt_len
            free, budget_left, taken = free - pages, budget_left - computed, taken | unheld
            prefill.append(request_id)
        return StepPlan(prefill=tuple(prefill), decode=decode, preempted=preempted)

    def _preempt(self) -> tuple[int, ...]:
        """Preempt the newest running requests until the others' next tokens fit; they go back
        to the front of the queue, oldest first, to be prefilled with all their tokens."""
        need = sum(self._growth(r.length) for r in self._running.values())
        out: list[tuple[int, _Request]] = []
        while need > self._free_pages() and len(self._running) > 1:
            request_id, request = self._running.popitem()  # the newest
            need -= self._growth(request.length)
            if self._pages is not None:
                self._pages.release(request_id)
            # Its next prefill carries what its decode would have: every token so far.
            request.prompt_len, request.length = request.length + 1, 0
            out.append((request_id, request))
        if out:
            self.preemptions += len(out)
            self._waiting = {**dict(reversed(out)), **self._waiting}
        return tuple(request_id for request_id, _ in out)

    def _admission(self, request_id: int, request: _Request, taken: set[int]
                   ) -> tuple[int, int, set[int]]:
        """(free pages a waiting request takes: on demand, its prompt's and its next token's;
        its tokens found cached; the unheld cached pages it takes)."""
        cached, unheld = 0, set[int]()
        pages = self._pages_of(request.prompt_len)
        if self._pages is not None and self._prefill_ids is not None:
            pages, cached, unheld = self._pages.new_cost(self._prefill_ids(request_id), taken)
        if not self._on_demand:
            return request.reserved, cached, unheld
        return pages + self._growth(request.prompt_len), cached, unheld

    def _free_pages(self) -> int:
        """Pages free now: the shards' (on demand), or those no running request reserves."""
        if not self._on_demand:
            held = sum(r.reserved for r in self._running.values())
        elif self._pages is not None:
            return self._pages.free_pages
        else:
            held = sum(self._pages_of(r.length) for r in self._running.values())
        return self.config.kv_capacity_pages - held

    def _growth(self, length: int) -> int:
        """Pages a sequence of `length` tokens needs for its next (on demand)."""
        return self._pages_of(length + 1) - self._pages_of(length) if self._on_demand else 0

    def _pages_of(self, tokens: int) -> int:
        return -(-tokens // self.config.kv_page_size)

    # -- counters for metrics -------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_reserved_waiting(self) -> int:
        """Waiting slots held by requests being tokenized."""
        return self._reserved_waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def kv_capacity_tokens(self) -> int:
        """The capacity the scheduler uses: configured tokens rounded down to whole pages."""
        return self.config.kv_capacity_pages * self.config.kv_page_size

    @property
    def kv_pages_used(self) -> int:
        """Pages the running requests hold (`full`: reserve); shared ones once given `pages`."""
        return self.config.kv_capacity_pages - self._free_pages()

    @property
    def kv_pages_free(self) -> int:
        return self._free_pages()

    @property
    def kv_tokens_reserved(self) -> int:
        return self.kv_pages_used * self.config.kv_page_size

    @property
    def kv_tokens_free(self) -> int:
        return self.kv_capacity_tokens - self.kv_tokens_reserved

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._waiting or request_id in self._running
