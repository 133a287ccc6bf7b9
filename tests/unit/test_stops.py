"""Stop checks against a brute-force reference: the whole text, cut at the first completed stop."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router_svc.stops import Finish, FinishReason, StopChecker, stop_string_finish
from services.errors import InvalidArgument


def reference(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Try every end position in order; the first at which some stop string ends wins (the
    longest of those ending there, i.e. the earliest start); cut where it starts."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            s = max(ending, key=len)
            return text[: end - len(s)], s
    return text, None


def stream(text: str, stops: list[str], cuts: list[int]) -> tuple[str, str | None]:
    """Feed `text` split at `cuts`, checking the invariants after every delta."""
    checker = StopChecker(stop_strings=stops, max_new_tokens=1)
    bounds = [0, *sorted(set(cuts)), len(text)]
    out, seen = "", ""
    for start, stop in itertools.pairwise(bounds):
        delta = text[start:stop]
        seen += delta
        safe, matched = checker.feed(delta)
        out += safe
        assert not any(s in out for s in stops), "a stop string was streamed"
        assert seen.startswith(out)
        if matched is not None:
            assert checker.feed("more text") == ("", None)  # the generation is over
            assert checker.flush() == ""
            return out, matched
        # nothing is held longer than it could still be the start of a stop string
        held = seen[len(out):]
        assert held == "" or any(s.startswith(held) and s != held for s in stops)
    return out + checker.flush(), None


ALPHABET = "ab\né"
texts = st.text(alphabet=ALPHABET, max_size=40)
stop_lists = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), max_size=4)


@settings(max_examples=1500, deadline=None)
@given(text=texts, stops=stop_lists, cuts=st.lists(st.integers(0, 40), max_size=20))
def test_streamed_text_equals_the_reference(text: str, stops: list[str],
                                            cuts: list[int]) -> None:
    cuts = [c for c in cuts if c <= len(text)]
    assert stream(text, stops, cuts) == reference(text, stops)


@settings(max_examples=300, deadline=None)
@given(text=texts, stops=stop_lists)
def test_one_character_at_a_time_equals_all_at_once(text: str, stops: list[str]) -> None:
    assert stream(text, stops, list(range(len(text)))) == stream(text, stops, [])


@pytest.mark.parametrize(("text", "stops", "deltas", "expected"), [
    ("Hello\n\nUser:", ["\n\nUser:"], ["Hello\n", "\nUs", "er:"], ("Hello", "\n\nUser:")),
    ("abcd", ["abcd", "bc"], ["a", "b", "c", "d"], ("a", "bc")),  # "bc" is completed first
    ("xabc", ["abc", "bc"], ["xab", "c"], ("x", "abc")),  # same end: the longer one
    ("a</s", ["</s>"], ["a<", "/s"], ("a</s", None)),  # held back, flushed at the end
    ("héllo wörld", [], ["hé", "llo", " wörld"], ("héllo wörld", None)),
])
def test_examples(text: str, stops: list[str], deltas: list[str],
                  expected: tuple[str, str | None]) -> None:
    cuts, pos = [], 0
    for d in deltas[:-1]:
        pos += len(d)
        cuts.append(pos)
    assert "".join(deltas) == text
    assert stream(text, stops, cuts) == expected


def test_held_text_is_released_as_soon_as_it_cannot_match() -> None:
    checker = StopChecker(stop_strings=["STOP"])
    assert checker.feed("go ST") == ("go ", None)
    assert checker.feed("O") == ("", None)
    assert checker.feed("RM") == ("STORM", None)
    assert checker.feed("") == ("", None)
    assert checker.flush() == ""
    assert stop_string_finish("STOP") == Finish(FinishReason.STOP, "stop string 'STOP'")


def test_token_stops() -> None:
    checker = StopChecker(stop_token_ids=[13], eos_token_ids=[2, 7], max_new_tokens=4)
    assert checker.check_token(5, 1) is None
    assert checker.check_token(2, 1) == Finish(FinishReason.STOP, "eos token 2")
    assert checker.check_token(7, 2) == Finish(FinishReason.STOP, "eos token 7")
    assert checker.check_token(13, 3) == Finish(FinishReason.STOP, "stop token 13")
    assert checker.check_token(5, 4) == Finish(FinishReason.LENGTH, "max_new_tokens 4 reached")
    assert checker.check_token(2, 4) == Finish(FinishReason.STOP, "eos token 2")  # eos wins


def test_ignore_eos_keeps_explicit_stop_tokens() -> None:
    checker = StopChecker(stop_token_ids=[2, 13], eos_token_ids=[2, 7], ignore_eos=True,
                          max_new_tokens=3)
    assert checker.check_token(7, 1) is None
    assert checker.check_token(2, 1) == Finish(FinishReason.STOP, "stop token 2")
    assert checker.check_token(13, 2) == Finish(FinishReason.STOP, "stop token 13")
    assert checker.check_token(7, 3) == Finish(FinishReason.LENGTH, "max_new_tokens 3 reached")


@pytest.mark.parametrize(("field", "kwargs"), [
    ("stop_strings", {"stop_strings": ["ok", ""]}),
    ("max_new_tokens", {"max_new_tokens": 0}),
    ("max_new_tokens", {"max_new_tokens": 2.0}),
])
def test_validation_names_the_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument, match=field):
        StopChecker(**kwargs)  # type: ignore[arg-type]
