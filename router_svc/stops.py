"""Stop conditions of one generation: stop tokens, the length limit, and stop strings in the text.

Token stops are checked on each sampled token id. Stop strings are checked on the detokenized text
as it streams: `feed` returns only text that can no longer become part of a stop string, holding
back a tail that could still be the start of one, so a stop string (and anything after it) is
never sent to a client.

Which stop string wins: the one that is *completed first* in the text (the smallest end index;
among those ending at the same place, the one starting earliest, i.e. the longest). The text is
cut where that match starts. A generator cannot wait for the future, so this is the only rule
whose result does not depend on how the text happens to be split into deltas. It differs from
"earliest start" only when one stop string occurs strictly inside another, ending sooner.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from services.errors import InvalidArgument


class FinishReason(enum.Enum):
    STOP = "stop"  # an end-of-sequence or stop token, or a stop string
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # the client went away or cancelled
    ERROR = "error"  # a step failed


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    detail: str  # which condition: "eos token 2", "stop string '\\n\\n'", ...


def stop_string_finish(stop_string: str) -> Finish:
    """The Finish of a generation that `StopChecker.feed` stopped on `stop_string`."""
    return Finish(FinishReason.STOP, f"stop string {stop_string!r}")


class StopChecker:
    """Stop conditions of one sequence; `feed` keeps the state of the text stream.

    The token that triggers a STOP from `check_token` is a control token: the caller should not
    detokenize it into the stream.
    """

    def __init__(self, stop_strings: Iterable[str] = (), stop_token_ids: Iterable[int] = (),
                 eos_token_ids: Iterable[int] = (), ignore_eos: bool = False,
                 max_new_tokens: int = 16) -> None:
        self.stop_strings = tuple(dict.fromkeys(stop_strings))  # deduplicated, order kept
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise InvalidArgument("stop_strings must be non-empty strings")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        self.stop_token_ids = frozenset(stop_token_ids)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.ignore_eos = ignore_eos
        self.max_new_tokens = max_new_tokens
        self._held = ""  # text that could still be the start of a stop string
        self._done = False  # a stop string matched: everything after it is discarded

    # -- tokens ---------------------------------------------------------------------------------

    def check_token(self, token_id: int, n_generated: int) -> Finish | None:
        """Whether the sequence ends with `token_id`, its `n_generated`-th generated token.

        An end-of-sequence token (unless ignore_eos) or a stop token wins over the length limit.
        """
        if token_id in self.eos_token_ids and not self.ignore_eos:
            return Finish(FinishReason.STOP, f"eos token {token_id}")
        if token_id in self.stop_token_ids:
            return Finish(FinishReason.STOP, f"stop token {token_id}")
        if n_generated >= self.max_new_tokens:
            return Finish(FinishReason.LENGTH, f"max_new_tokens {self.max_new_tokens} reached")
        return None

    # -- text -----------------------------------------------------------------------------------

    def feed(self, delta: str) -> tuple[str, str | None]:
        """(text safe to stream now, the stop string matched or None) after `delta`.

        Once a stop string matched, the generation is over: later deltas are discarded.
        """
        if self._done:
            return "", None
        text = self._held + delta
        match = _first_completed(text, self.stop_strings)
        if match is not None:
            start, stop_string = match
            self._held, self._done = "", True
            return text[:start], stop_string
        keep = _partial_tail(text, self.stop_strings)
        self._held = text[len(text) - keep:]
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """The held-back text, at the end of a generation that did not stop on a string."""
        held, self._held = self._held, ""
        return held


def _first_completed(text: str, stop_strings: tuple[str, ...]) -> tuple[int, str] | None:
    """(start, stop string) of the match with the smallest end; ties: the earliest start."""
    best: tuple[int, int, str] | None = None  # (end, start, stop string)
    for s in stop_strings:
        start = text.find(s)
        if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
            best = (start + len(s), start, s)
    return None if best is None else (best[1], best[2])


def _partial_tail(text: str, stop_strings: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    longest = max((len(s) for s in stop_strings), default=1)
    for n in range(min(len(text), longest - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stop_strings):
            return n
    return 0
