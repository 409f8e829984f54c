"""Streamed text as a sample grows: only stable text goes out, stop strings never leak, the end is exact."""

from __future__ import annotations

from tinkerkube_contract.pod_api import DecodedText
from tinkerkube_gateway.compat.increments import ChoiceStreams, Delta, held_back
from tinkerkube_gateway.compat.shaping import Choice, choice
from tinkerkube_gateway.compat.values import Sampled


def _shaped(pieces: list[str], stops: tuple[str, ...], *, stopped: bool = False, text: str | None = None) -> Choice:
    """A choice from token pieces (text: the decoded whole, when it differs from the joined pieces)."""
    seq = Sampled(tokens=list(range(len(pieces))), logprobs=[-1.0] * len(pieces), top=None, stopped=stopped)
    decoded = DecodedText(text="".join(pieces) if text is None else text, pieces=pieces, special=[False] * len(pieces))
    return choice(seq, decoded, stops, {})


def _text(deltas: list[list[Delta]]) -> str:
    return "".join(p.text for batch in deltas for d in batch for p in d.pieces)


def test_held_back_is_the_longest_suffix_that_could_start_a_stop() -> None:
    assert held_back("hello wo", ("world",)) == 2
    assert held_back("hello w", ("xyz", "w!")) == 1
    assert held_back("hello", ("world",)) == 0
    assert held_back("ab", ("abc",)) == 2
    assert held_back("abc", ("abc",)) == 0  # a whole stop string is found, not held (shaping cuts it)


def test_a_stop_string_split_over_tokens_never_leaks() -> None:
    stops = ("END",)
    streams = ChoiceStreams(stops)
    grown = ["Hi ", "E", "N", "D", "x"]
    out = []
    for k in range(1, len(grown)):
        out.append(streams.grow([_shaped(grown[:k], stops)]))
        assert "E" not in _text(out)  # not even the first letter of "END" while it may be the stop
    out.append(streams.end([_shaped(grown, stops, stopped=True)]))
    assert _text(out) == "Hi "
    assert out[-1][0].final is not None and out[-1][0].final.stop_sequence == "END"


def test_a_false_start_of_a_stop_string_is_sent_once_it_is_known() -> None:
    stops = ("END",)
    streams = ChoiceStreams(stops)
    assert _text([streams.grow([_shaped(["a", "EN"], stops)])]) == "a"
    assert _text([streams.grow([_shaped(["a", "EN", "o"], stops)])]) == "ENo"


def test_an_incomplete_character_waits_for_its_last_byte() -> None:
    streams = ChoiceStreams(())
    first = streams.grow([_shaped(["a", "\ufffd"], (), text="a\ufffd")])
    assert _text([first]) == "a"
    second = streams.grow([_shaped(["a", "\ufffd", "\ufffd"], (), text="aé")])
    assert _text([second]) == "é"


def test_joined_deltas_are_the_final_text_with_one_token_entry_per_kept_token() -> None:
    streams = ChoiceStreams((), first_index=3)
    words = ["The", " cat", " sat", " down"]
    out = [streams.grow([_shaped(words[:k], ())]) for k in (1, 3)]
    final = _shaped(words, ())
    out.append(streams.end([final]))
    assert _text(out) == final.text
    tokens = [p.token for batch in out for d in batch for p in d.pieces if p.token is not None]
    assert tokens == list(final.tokens)
    assert {d.index for batch in out for d in batch} == {3}


def test_n_choices_grow_independently_by_index() -> None:
    streams = ChoiceStreams(())
    first = streams.grow([_shaped(["a"], ()), _shaped(["x", "y"], ())])
    assert [(d.index, "".join(p.text for p in d.pieces)) for d in first] == [(0, "a"), (1, "xy")]
    second = streams.grow([_shaped(["a"], ()), _shaped(["x", "y", "z"], ())])
    assert [(d.index, "".join(p.text for p in d.pieces)) for d in second] == [(1, "z")]  # nothing new for 0
